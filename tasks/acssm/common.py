"""What the acssm stages pass to each other: task names, the split files, meta.json and runs.json."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.core import io

TASK_NAMES = ("classification", "regression", "interpolation", "extrapolation")
TaskName = Literal["classification", "regression", "interpolation", "extrapolation"]
ModelName = Literal["acssm", "acssm_noskip", "gru_dt", "latent_sde"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskMeta(_Record):
    """One task's entry in prepare's meta.json."""

    task: Literal["classification", "regression"]     # the model head: categorical or Gaussian
    obs_dim: int
    out_dim: int                                       # classes, or target channels
    n_train: int
    n_test: int
    points: int                                        # time points per series (padded)
    source: str
    channels: list[str] | None                         # real series: channel names
    scale: list[float] | None                          # real series: the training split's channel scale
    image_shape: list[int] | None                      # image observations: (C, H, W) of a flattened frame


class RunSummary(_Record):
    """One (task, model, seed) training in finetune's runs.json (no wall-clock numbers: those differ run
    to run; the speed stage times the models)."""

    task: TaskName
    model: ModelName
    seed: int
    final_loss: float


def split_file(folder: Path, task_name: str, split: str) -> Path:
    return Path(folder) / f"{task_name}_{split}.npz"


def load_split(folder: Path, task_name: str, split: str) -> dict[str, np.ndarray]:
    return io.load_arrays(split_file(folder, task_name, split))


def read_meta(folder: Path) -> dict[str, TaskMeta]:
    return {name: TaskMeta.model_validate(entry) for name, entry in io.read_json(Path(folder) / "meta.json").items()}


def read_runs(folder: Path) -> list[RunSummary]:
    return [RunSummary.model_validate(entry) for entry in io.read_json(Path(folder) / "runs.json")]


def run_dir(folder: Path, task_name: str, model: str, seed: int) -> Path:
    """finetune's folder of one training: model.safetensors, test_predictions.npz, history.json."""
    return Path(folder) / task_name / model / f"seed{seed}"
