"""Tiny top-level job functions for worker-process tests (kept apart so workers import little)."""


def square(x: int) -> tuple[int, int]:
    import torch

    if x < 0:
        raise ValueError(f"job {x} failed")
    return x * x, torch.get_num_threads()
