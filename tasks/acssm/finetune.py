"""acssm finetune: ACSSM and the baselines (GRU-dt, torchsde latent SDE) on every task and seed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tasks.acssm.common import ModelName, RunSummary, TaskName, load_split, read_meta, run_dir
from tasks.core import Params, StageContext, io, stage


class FinetuneParams(Params):
    tasks: list[TaskName] = Field(min_length=1)
    models: list[ModelName] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1, description="training seeds (model init, batches, latent noise)")
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(ge=0, description="max grad norm (0 = off)")
    width: int = Field(gt=0, description="encoder / decoder width")
    state_dim: int = Field(gt=0, description="latent SDE dimension (same for ACSSM and latent_sde)")
    num_basis: int = Field(gt=0, description="negative-definite bases in the drift mixture")
    n_layers: int = Field(gt=0, description="Transformer encoder layers")
    n_heads: int = Field(gt=0)
    time_scale: float = Field(gt=0, description="time-encoding scale (ts)")
    skip: bool = Field(description="decoder also sees z_k (the official 'skip' term); the model "
                       "'acssm_noskip' is ACSSM with it off (the ablation)")
    obs_var: float = Field(gt=0, description="fixed variance of the Gaussian decoder")
    lambda_control: float = Field(ge=0, description="weight of 1/2 sum ||alpha||^2 dt (official 1e-6)")
    lambda_potential: float = Field(ge=0, description="weight of -log g potential (official 1e-8)")
    train_samples: int = Field(gt=0, description="latent samples per series in training")
    eval_samples: int = Field(gt=0, description="latent samples per series at test time")
    sde_dt: float = Field(gt=0, description="torchsde Euler step of the latent_sde baseline")
    num_threads: int = Field(gt=0, description="torch threads (1 is much faster on a loaded 2-core box)")
    workers: int = Field(gt=0, description="processes training independent (task, model, seed) runs "
                                           "in parallel, one torch thread each (CPU: one per core)")


@dataclass(frozen=True)
class FitJob:
    """One (task, model, seed) training, picklable for the worker processes."""

    task: str
    model: str
    seed: int
    data_dir: str
    out_dir: str
    device: str
    params: FinetuneParams


@dataclass
class FitResult:
    summary: RunSummary
    history: list[dict]


def model_config(p: FinetuneParams) -> dict:
    return dict(width=p.width, state_dim=p.state_dim, num_basis=p.num_basis, n_layers=p.n_layers,
                n_heads=p.n_heads, time_scale=p.time_scale, skip=p.skip, sde_dt=p.sde_dt, obs_var=p.obs_var)


def fit_one(job: FitJob) -> FitResult:
    """Train one model on one task and seed, save its weights and test predictions (a top-level
    function so that worker processes can run it)."""
    import torch

    from models.acssm.fit import build_model, predict, train_model
    from models.acssm.networks import LossWeights
    from models.acssm.scores import to_tensors

    p, device = job.params, torch.device(job.device)
    info = read_meta(Path(job.data_dir))[job.task]
    train = to_tensors(load_split(Path(job.data_dir), job.task, "train"), device)
    test = to_tensors(load_split(Path(job.data_dir), job.task, "test"), device)
    torch.manual_seed(job.seed)
    model = build_model(job.model, info.task, info.obs_dim, info.out_dim, model_config(p),
                        causal=(job.task == "extrapolation")).to(device)
    deterministic = job.model == "gru_dt"
    history = train_model(model, train, p.epochs, p.batch_size, p.lr, p.weight_decay,
                          LossWeights(p.lambda_control, p.lambda_potential),
                          1 if deterministic else p.train_samples, job.seed, p.grad_clip)
    out = predict(model, test, 1 if deterministic else p.eval_samples)
    folder = Path(job.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    io.save_state(folder / "model.safetensors", model.state_dict())
    io.save_arrays(folder / "test_predictions.npz", **{k: v.cpu().numpy() for k, v in out.items()})
    io.write_json(folder / "history.json", [{k: v for k, v in r.items() if k != "seconds"} for r in history])
    summary = RunSummary(task=job.task, model=job.model, seed=job.seed, final_loss=history[-1]["loss"])
    return FitResult(summary, history)


@stage(params=FinetuneParams, inputs=("prepare",), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """Train every (task, model, seed) in ``workers`` processes; runs.json lists them (seconds per
    epoch go to MLflow only: the speed stage times the models alone)."""
    if p.width % p.n_heads:
        raise ValueError(f"acssm.finetune.width ({p.width}) must be divisible by n_heads ({p.n_heads})")
    import torch

    torch.set_num_threads(p.num_threads)
    src = ctx.input("prepare")
    jobs = [FitJob(t, m, s, str(src), str(run_dir(ctx.out_dir, t, m, s)), str(ctx.device), p)
            for t in p.tasks for s in p.seeds for m in p.models]

    def log(i: int, res: FitResult) -> None:
        tag = f"{res.summary.task}/{res.summary.model}/s{res.summary.seed}"
        for rec in res.history:
            ctx.log_metrics({f"{tag}/loss": rec["loss"], f"{tag}/sec_per_epoch": rec["seconds"]},
                            step=rec["epoch"])

    results = ctx.map(fit_one, jobs, workers=p.workers, desc="acssm finetune", on_result=log)
    io.write_json(ctx.out_dir / "runs.json", [r.summary.model_dump() for r in results])
