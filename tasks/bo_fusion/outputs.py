"""The JSON records the bo_fusion stages pass on (hpo.json, finetune.json, fuse.json), as pydantic models:
written with `write`, read back and re-validated with `read` by the stage downstream."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.core import io

Variant = Literal["full", "lora"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate(io.read_json(path))

    def write(self, path: Path) -> None:
        io.write_json(path, self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- hpo
class Hyperparameters(Record):
    lr: float
    batch_size: int


class ProxyRun(Record):
    lr: float
    batch_size: int
    best_val_f1: float


class TransferRun(Record):
    """The full model trained like a proxy run (same steps), at one learning rate and seed."""

    seed: int
    lr: float
    best_val_f1: float


class TransferCheck(Record):
    """The full model at the grid's learning rates and at the chosen one, per seed (chosen batch size)."""

    seeds: list[int]
    grid: list[TransferRun]
    at_chosen: list[TransferRun]
    majority_val_f1: float   # val macro-F1 of always predicting the majority class


class HpoVariant(Record):
    chosen: Hyperparameters
    runs: list[ProxyRun]
    proxy_frozen_layers: int
    proxy_lora_rank: int
    seconds: float
    bo_model_seconds: float
    bo_eval_seconds: float
    transfer: TransferCheck | None


class HpoResult(Record):
    variants: dict[str, HpoVariant]


# ----------------------------------------------------------------------------------------- finetune
class FinetuneRun(Record):
    variant: Variant
    seed: int
    lr: float
    batch_size: int
    seconds: float
    val_curve: list[tuple[int, float, float]]  # (step, val macro-F1, val loss) until early stopping
    best_step: int            # the early-stopping step (best val macro-F1 on the evaluation grid)
    best_val_f1: float        # the early-stopped model's val macro-F1
    stop_step: int            # where the patience ran out
    last_step: int            # the last step trained (the window's end, unless max_steps cut it)
    window: list[float]       # [start, end] of the checkpoint window in steps
    checkpoint_steps: list[int]   # the K members, in this order in tag.safetensors
    truncated: bool           # max_steps ended training before the window's end
    trainable_params: int


class FinetuneResult(Record):
    runs: dict[str, FinetuneRun]   # tag = f"{variant}_seed{seed}" -> tag.safetensors holds its K checkpoints
    lora_rank: int
    lora_alpha: float


# --------------------------------------------------------------------------------------------- fuse
class MethodScores(Record):
    val_f1: float
    val_loss: float
    test_f1: float
    test_loss: float
    weights: list[float]


class MemberScores(Record):
    step: int
    f1: float
    loss: float


class LandscapePoint(Record):
    f1: float
    loss: float
    kind: Literal["member", "fused"]


class FuseTiming(Record):
    bomf_model_seconds: float
    bomf_eval_seconds: float
    bo_total_seconds: dict[str, float]
    single_objective: dict[str, dict[str, float]]
    val_eval_seconds_total: float
    val_evaluations: int


class FuseRun(Record):
    variant: Variant
    seed: int
    methods: dict[str, MethodScores]
    best_step: int                    # stage 2's early-stopping step
    early_stop_val_f1: float          # the early-stopped model's val macro-F1
    majority_val_f1: float            # val macro-F1 of always predicting the majority class
    members_val: list[MemberScores]   # the K stage-2 checkpoints on val (their steps)
    landscape: list[LandscapePoint]   # every point evaluated on val (members and fused)
    bomf_Y: list[list[float]]
    bomf_pareto: list[bool]
    hypervolume: list[float]
    timing: FuseTiming


class FuseResult(Record):
    runs: dict[str, FuseRun]
