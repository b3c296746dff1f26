"""One (task, model, seed) training of the acssm stages (finetune, ablation), picklable for the worker
processes: the settings it runs with, the job, and ``fit_one`` (saves weights, test predictions and the
loss history; returns a summary). Holds no stage: the stages build the settings from their params."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.acssm.common import RunSummary, load_split, read_meta
from tasks.core import io


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training uses, resolved for its task. ``model``: the ``build_model`` config
    (width, state_dim, num_basis, n_layers, n_heads, dropout, time_scale, init_sigma, skip, sde_dt,
    obs_var, encoder)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    lambda_control: float
    lambda_potential: float
    train_samples: int
    eval_samples: int
    model: dict


@dataclass(frozen=True)
class FitJob:
    task: str
    model: str
    seed: int
    data_dir: str
    out_dir: str
    device: str
    settings: TrainSettings


@dataclass
class FitResult:
    summary: RunSummary
    history: list[dict]


def fit_one(job: FitJob) -> FitResult:
    """Train one model on one task and seed, save its weights and test predictions (a top-level
    function so that worker processes can run it)."""
    import torch

    from models.acssm.fit import build_model, predict, train_model
    from models.acssm.networks import LossWeights
    from models.acssm.scores import to_tensors

    s, device = job.settings, torch.device(job.device)
    info = read_meta(Path(job.data_dir))[job.task]
    train = to_tensors(load_split(Path(job.data_dir), job.task, "train"), device)
    test = to_tensors(load_split(Path(job.data_dir), job.task, "test"), device)
    torch.manual_seed(job.seed)
    model = build_model(job.model, info.task, info.obs_dim, info.out_dim, s.model,
                        causal=(job.task == "extrapolation"), image_shape=info.image_shape).to(device)
    deterministic = job.model == "gru_dt"
    history = train_model(model, train, s.epochs, s.batch_size, s.lr, s.weight_decay,
                          LossWeights(s.lambda_control, s.lambda_potential),
                          1 if deterministic else s.train_samples, job.seed, s.grad_clip)
    out = predict(model, test, 1 if deterministic else s.eval_samples)
    folder = Path(job.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    io.save_state(folder / "model.safetensors", model.state_dict())
    io.save_arrays(folder / "test_predictions.npz", **{k: v.cpu().numpy() for k, v in out.items()})
    io.write_json(folder / "history.json", [{k: v for k, v in r.items() if k != "seconds"} for r in history])
    summary = RunSummary(task=job.task, model=job.model, seed=job.seed, final_loss=history[-1]["loss"])
    return FitResult(summary, history)
