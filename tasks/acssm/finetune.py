"""acssm finetune: ACSSM and the baselines (GRU-dt, torchsde latent SDE) on every task and seed, each task
with the shared settings or its own (``per_task``: the paper's per-task configs at paper scale)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.acssm.common import ModelName, TaskName, run_dir
from tasks.acssm.training import FitJob, FitResult, TrainSettings, fit_one
from tasks.core import Params, StageContext, io, stage


class TaskConfig(Params):
    """One task's own settings (the paper's per-task configs, e.g. activity: state 288, 256 bases); they
    replace the shared values of the same names for that task. Every key is required."""

    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(ge=0, description="max grad norm (0 = off; the paper clips classification only)")
    state_dim: int = Field(gt=0)
    num_basis: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    time_scale: float = Field(gt=0)
    init_sigma: float = Field(gt=0)


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
    dropout: float = Field(ge=0, lt=1, description="Transformer encoder dropout")
    time_scale: float = Field(gt=0, description="time-encoding scale (ts)")
    init_sigma: float = Field(gt=0, description="scale of the initial latent variance")
    skip: bool = Field(description="decoder also sees z_k (the official 'skip' term); the model "
                       "'acssm_noskip' is ACSSM with it off (the ablation)")
    encoder: Literal["mlp", "cnn"] = Field(description="embedding of image observations (the paper-scale "
                                           "pendulum frames): 'cnn' (the paper's conv net) or 'mlp' on the "
                                           "flattened pixels; vector observations always use the MLP")
    obs_var: float = Field(gt=0, description="fixed variance of the Gaussian decoder")
    lambda_control: float = Field(ge=0, description="weight of 1/2 sum ||alpha||^2 dt (official 1e-6)")
    lambda_potential: float = Field(ge=0, description="weight of -log g potential (official 1e-8)")
    train_samples: int = Field(gt=0, description="latent samples per series in training")
    eval_samples: int = Field(gt=0, description="latent samples per series at test time")
    sde_dt: float = Field(gt=0, description="torchsde Euler step of the latent_sde baseline")
    per_task: dict[TaskName, TaskConfig] = Field(description="per-task settings replacing the shared ones "
                                                 "({} at CPU scale: one config for every task)")
    num_threads: int = Field(gt=0, description="torch threads (1 is much faster on a loaded 2-core box)")
    workers: int = Field(gt=0, description="processes training independent (task, model, seed) runs "
                                           "in parallel, one torch thread each (CPU: one per core)")


def settings_for(p: FinetuneParams, task: str) -> TrainSettings:
    """The settings of ``task``: the shared values, replaced by the task's entry of ``per_task``."""
    own = p.per_task[task].model_dump() if task in p.per_task else {}
    v = {**p.model_dump(), **own}
    model = {k: v[k] for k in ("width", "state_dim", "num_basis", "n_layers", "n_heads", "dropout", "time_scale",
                               "init_sigma", "skip", "sde_dt", "obs_var", "encoder")}
    return TrainSettings(epochs=v["epochs"], batch_size=v["batch_size"], lr=v["lr"], weight_decay=v["weight_decay"],
                         grad_clip=v["grad_clip"], lambda_control=p.lambda_control,
                         lambda_potential=p.lambda_potential, train_samples=p.train_samples,
                         eval_samples=p.eval_samples, model=model)


@stage(params=FinetuneParams, inputs=("prepare",), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """Train every (task, model, seed) in ``workers`` processes; runs.json lists them (seconds per
    epoch go to MLflow only: the speed stage times the models alone)."""
    if p.width % p.n_heads:
        raise ValueError(f"acssm.finetune.width ({p.width}) must be divisible by n_heads ({p.n_heads})")
    import torch

    torch.set_num_threads(p.num_threads)
    src = ctx.input("prepare")
    jobs = [FitJob(t, m, s, str(src), str(run_dir(ctx.out_dir, t, m, s)), str(ctx.device), settings_for(p, t))
            for t in p.tasks for s in p.seeds for m in p.models]

    def log(i: int, res: FitResult) -> None:
        tag = f"{res.summary.task}/{res.summary.model}/s{res.summary.seed}"
        for rec in res.history:
            ctx.log_metrics({f"{tag}/loss": rec["loss"], f"{tag}/sec_per_epoch": rec["seconds"]},
                            step=rec["epoch"])

    results = ctx.map(fit_one, jobs, workers=p.workers, desc="acssm finetune", on_result=log)
    io.write_json(ctx.out_dir / "runs.json", [r.summary.model_dump() for r in results])
