"""What the vp_gcnn stages share: data files, the model settings, and one training run (a job)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.core import Params, io

DATASETS = ("digits67", "rotated", "colour")
ROTATION_SETS = ("digits67", "rotated")


def data_file(name: str) -> str:
    return f"{name}.npz"


def load_split(folder: Path, name: str, split: str) -> dict[str, np.ndarray]:
    arrays = io.load_arrays(Path(folder) / data_file(name))
    return {k[: -len(split) - 1]: v for k, v in arrays.items() if k.endswith(f"_{split}")}


def run_name(dataset: str, model: str, seed: int, lam: float | None = None) -> str:
    return f"{dataset}_{model}_seed{seed}" + ("" if lam is None else f"_lam{lam:g}")


class RotationSettings(Params):
    n_rotations: int = Field(gt=0, description="N: rotations sampled per layer (a multiple of 4: exact C_4 tests)")
    channels: int = Field(gt=0)
    hidden: int = Field(gt=0, description="width of the kernel MLPs")
    kernel_size: int = Field(gt=0, description="odd kernel side; the kernel lives on the inscribed disk")
    group_layers: int = Field(gt=0, description="group convolutions after the lifting layer (each learns theta)")
    theta_init: float = Field(gt=0, lt=1, description="initial theta (sigmoid-parametrised, inside (0, 1))")
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    lr_theta: float = Field(gt=0, description="learning rate of theta parameters (tied to the step budget)")
    weight_decay: float = Field(ge=0)


class ColourSettings(Params):
    hue_shifts: int = Field(gt=1, description="m: hue rotations by 360/m degrees")
    channels: int = Field(gt=0)
    layers: int = Field(gt=1, description="hue lifting + (layers - 1) hue group convolutions")
    kernel_size: int = Field(gt=0)
    encoder_width: int = Field(gt=0, description="width of the first layer's keep encoder")
    keep_init: float = Field(gt=0.5, lt=1, description="initial keep probability of Bernoulli variants")
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    lr_theta: float = Field(gt=0, description="learning rate of keep-distribution parameters")
    weight_decay: float = Field(ge=0)
    temperature_start: float = Field(gt=0, description="RelaxedBernoulli temperature at the first step")
    temperature_end: float = Field(gt=0, description="... annealed linearly to this at the last step")


@dataclass(frozen=True)
class Job:
    """One training run: ``model`` on ``dataset`` with ``seed`` and regulariser weight ``lam``; predictions
    on ``eval_split`` (val for the sweep, test for the final runs)."""

    dataset: str
    model: str
    seed: int
    lam: float
    eval_split: str
    data_dir: str
    settings: dict
    n_classes: int
    device: str


def build_model(job: Job):
    from models.vp_gcnn.colour import ColourNet
    from models.vp_gcnn.rotation import RotationNet

    s = job.settings
    if job.dataset == "colour":
        return ColourNet(job.model, s["hue_shifts"], s["channels"], s["layers"], s["kernel_size"], job.n_classes,
                         s["encoder_width"], s["keep_init"])
    return RotationNet(job.model, s["n_rotations"], s["channels"], s["hidden"], s["kernel_size"], job.n_classes,
                       s["group_layers"], s["theta_init"])


def train_job(job: Job) -> dict:
    """Train, recompute batch-norm statistics on the training set, predict on ``eval_split``."""
    import torch

    from models.vp_gcnn.train import TrainConfig, fit, invariance_error, predict, recompute_batch_norm

    s, device = job.settings, torch.device(job.device)
    torch.manual_seed(job.seed)
    train, held = (load_split(job.data_dir, job.dataset, split) for split in ("train", job.eval_split))
    as_t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)
    x, y = as_t(train["x"]), as_t(train["y"], torch.long)
    model = build_model(job).to(device)
    cfg = TrainConfig(s["epochs"], s["batch_size"], s["lr"], s["lr_theta"], s["weight_decay"], job.lam,
                      s.get("temperature_start", 1.0), s.get("temperature_end", 1.0))
    losses = fit(model, x, y, cfg, torch.Generator().manual_seed(job.seed))
    recompute_batch_norm(model, x, s["batch_size"])
    out = predict(model, as_t(held["x"]), 2 * s["batch_size"])
    probs = out["probs"].numpy()
    result = {"job": job, "losses": np.asarray(losses, dtype=np.float32), "probs": probs,
              "subset": out["subset"].numpy(), "labels": held["y"],
              "accuracy": float((probs.argmax(1) == held["y"]).mean()),
              "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    if job.dataset != "colour" and job.model == "gcnn":
        result["invariance_error"] = invariance_error(model, as_t(held["x"][:64]))
    return result
