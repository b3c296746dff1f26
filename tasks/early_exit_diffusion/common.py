"""Model helpers shared by pretrain, finetune and evaluate: loading a DiT, the training noise schedule,
the named variants' exit schedules, and the meta files the two training stages write."""
from __future__ import annotations

from pathlib import Path

from tasks.core import Params, io


class PretrainedMeta(Params):
    """``pretrain/meta.json``: one base per seed in ``model_seed<seed>/`` (trained from scratch), or one
    loaded model in ``model/`` that every seed shares (``seeds`` None)."""

    init: str
    num_layers: int
    parameters: int
    seeds: list[int] | None            # the seeds with their own base; None: ``model/`` serves every seed
    final_loss: list[float] | None     # per base: mean of its last 100 steps' losses (None when loaded)


class FinetuneRun(Params):
    schedule: list[int]
    final_loss: float


class FinetunedMeta(Params):
    """``finetune/meta.json``: one fine-tuned model per (variant, seed) in ``<variant>_seed<seed>/``."""

    schedule: list[int]
    variants: list[str]
    seeds: list[int]
    runs: dict[str, FinetuneRun]


def base_dir(pretrain: Path, seed: int) -> Path:
    """The folder of the base model that seed ``seed`` fine-tunes and samples from."""
    from tasks.core.errors import MissingInputError

    meta = PretrainedMeta.model_validate(io.read_json(pretrain / "meta.json"))
    if meta.seeds is None:
        return pretrain / "model"
    if seed not in meta.seeds:
        raise MissingInputError(f"seed {seed} has no pretrained base (bases exist for seeds {meta.seeds}): add it "
                                f"to 'early_exit_diffusion.pretrain.seeds' (each fine-tuning seed starts from its "
                                f"own base) and run 'dvc repro early_exit_diffusion-pretrain'")
    return pretrain / f"model_seed{seed}"


def load_dit(folder: Path, subfolder: str | None = None):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(folder), subfolder=subfolder, use_safetensors=True)
    model.register_to_config(_name_or_path="")  # no checkout path in the configs this model saves again
    return model


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
