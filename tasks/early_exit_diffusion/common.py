"""Model helpers shared by pretrain, finetune and evaluate: loading a DiT, the training noise schedule,
the named variants' exit schedules, and the meta files the two training stages write."""
from __future__ import annotations

from pathlib import Path

from tasks.core import Params


class PretrainedMeta(Params):
    """``pretrain/meta.json``."""

    init: str
    num_layers: int
    parameters: int
    final_loss: float | None           # mean of the last 100 steps' losses (None when loaded)


class FinetuneRun(Params):
    schedule: list[int]
    final_loss: float


class FinetunedMeta(Params):
    """``finetune/meta.json``: one fine-tuned model per (variant, seed) in ``<variant>_seed<seed>/``."""

    schedule: list[int]
    variants: list[str]
    seeds: list[int]
    runs: dict[str, FinetuneRun]


def load_dit(folder: Path, subfolder: str | None = None):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(str(folder), subfolder=subfolder)


def noise_scheduler_config() -> dict:
    """The training noise schedule shared by every stage (DiT / ADM: 1000 linear betas)."""
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def variant_schedule(name: str, model, blocks: list[int]):
    """The exit schedule of a named variant (validated against the model's depth).

    ``ase``/``naive``: the schedule; ``reversed``: its counts in the opposite time order;
    ``full``/``full_control``: every block; ``uniform``: a constant ``round(mean)`` blocks.
    """
    from models.early_exit_diffusion import ExitSchedule, schedule_for

    ase = schedule_for(model, blocks)
    if name in ("ase", "naive"):
        return ase
    if name == "reversed":
        return ase.reversed()
    if name in ("full", "full_control"):
        return schedule_for(model, None)
    if name == "uniform":
        return ExitSchedule((max(1, round(ase.mean_blocks)),) * ase.n_bins, ase.num_layers)
    raise ValueError(f"unknown variant {name!r}")
