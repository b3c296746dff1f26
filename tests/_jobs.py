"""Tiny top-level job functions for worker-process tests (kept apart so workers import little)."""


def square(x: int) -> tuple[int, int]:
    import torch

    if x < 0:
        raise ValueError(f"job {x} failed")
    return x * x, torch.get_num_threads()


def seeded_draw(seed: int) -> list[float]:
    """A stand-in for a training run that seeds torch's global generator itself (as peft's LoRA init needs)."""
    import torch

    torch.manual_seed(seed)
    return torch.randn(3).tolist()
