"""acssm speed: seconds per training epoch of ACSSM (closed-form moments + scan) against the torchsde
latent SDE over a sweep of Euler steps per sequence, each model timed alone in this one process.

The claim ``simulation_free_speedup`` is decided (in evaluate) at ``claim_steps`` solver steps per
sequence, the number the paper's data imply: the paper's pendulum series have 100 time points (half of
them observed), and a fixed-step solver needs at least 2 steps per time point, i.e. >= 200 steps per
sequence. The CPU-scale pendulum has the same 100 grid points (step 0.05), so the sweep is over the
Euler step dt = horizon / steps on that task."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from tasks.acssm.common import TaskName, load_split, read_meta
from tasks.core import Params, StageContext, io, stage


class SpeedParams(Params):
    task: TaskName = Field(description="the task whose training split is the timed epoch (regression: "
                           "the pendulum, 100 time points as in the paper)")
    steps: list[int] = Field(min_length=1, description="Euler steps per sequence of the latent SDE (sweep)")
    claim_steps: int = Field(gt=0, description="steps per sequence at which simulation_free_speedup is "
                             "decided (2 per time point of the paper's 100-point pendulum: 200)")
    repeats: int = Field(ge=2, description="interleaved timing rounds; each builds fresh models from seed "
                         "= the round, so the claim has one ratio per round")
    max_series: int = Field(gt=0, description="training series in a timed epoch (at most the split's)")
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    width: int = Field(gt=0)
    state_dim: int = Field(gt=0)
    num_basis: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    time_scale: float = Field(gt=0)
    encoder: Literal["mlp", "cnn"] = Field(description="embedding of image observations (as in finetune)")
    train_samples: int = Field(gt=0, description="latent samples per series (same for both models)")
    num_threads: int = Field(gt=0, description="torch threads of this (single) timing process")

    @field_validator("claim_steps")
    @classmethod
    def _claim_steps_in_sweep(cls, v: int, info: ValidationInfo) -> int:
        if v not in info.data.get("steps", [v]):
            raise ValueError(f"claim_steps ({v}) must be one of steps {info.data.get('steps')}")
        return v


def _config(p: SpeedParams, sde_dt: float) -> dict:
    """The timed models' config; dropout 0, init_sigma 1 and obs_var 0.01 change values, not the cost."""
    return dict(width=p.width, state_dim=p.state_dim, num_basis=p.num_basis, n_layers=p.n_layers,
                n_heads=p.n_heads, dropout=0.0, time_scale=p.time_scale, init_sigma=1.0, skip=True,
                sde_dt=sde_dt, obs_var=0.01, encoder=p.encoder)


def euler_step(horizon: float, steps: int) -> float:
    """The torchsde Euler step that covers ``horizon`` in exactly ``steps`` steps: horizon / (steps - 1/2),
    so float rounding never adds a last step of ~1e-7 (a tiny interval makes torchsde's Brownian
    interval tree recurse deeply: 100x slower epochs in a first measurement)."""
    return horizon / (steps - 0.5)


def timed_round(info, train: dict, p: SpeedParams, dts: dict, seed: int, max_batches: int | None = None) -> dict:
    """One epoch of every model (ACSSM, the latent SDE at each step count), built fresh from ``seed``,
    interleaved batch by batch (the order rotated per batch) so that a change of machine load hits all
    models alike; returns the seconds of each model's epoch (the sum of its step times)."""
    import time

    import torch

    from models.acssm.fit import build_model, train_step
    from models.acssm.networks import LossWeights

    keys = ["acssm", *dts]
    models, opts = {}, {}
    for key in keys:
        torch.manual_seed(seed)
        name, sde_dt = ("acssm", 1.0) if key == "acssm" else ("latent_sde", dts[key])
        models[key] = build_model(name, info.task, info.obs_dim, info.out_dim, _config(p, sde_dt), causal=False,
                                  image_shape=info.image_shape)
        opts[key] = torch.optim.AdamW(models[key].parameters(), lr=p.lr, weight_decay=0.0)
    n = train["times"].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    starts = list(range(0, n, p.batch_size))[:max_batches]
    seconds = dict.fromkeys(keys, 0.0)
    for j, i in enumerate(starts):
        batch = {k: v[perm[i:i + p.batch_size]] for k, v in train.items()}
        for key in keys[j % len(keys):] + keys[:j % len(keys)]:
            start = time.perf_counter()
            train_step(models[key], opts[key], batch, LossWeights(1e-6, 1e-8), p.train_samples, 0.0)
            seconds[key] += time.perf_counter() - start
    return seconds


def sweep(info, train: dict, p: SpeedParams, horizon: float, progress) -> dict:
    """``repeats`` timed rounds after one untimed warm-up batch of every model."""
    dts = {s: euler_step(horizon, s) for s in p.steps}
    timed_round(info, train, p, dts, seed=10_000, max_batches=1)
    rounds = [timed_round(info, train, p, dts, seed=r) for r in progress(range(p.repeats), desc="timing rounds",
                                                                          total=p.repeats)]
    return {"acssm_seconds": [r["acssm"] for r in rounds],
            "latent_sde_seconds": {str(s): [r[s] for r in rounds] for s in p.steps},
            "sde_dt": {str(s): dts[s] for s in p.steps}}


@stage(params=SpeedParams, inputs=("prepare",), gpu=True)
def speed(ctx: StageContext, p: SpeedParams) -> None:
    """Time both models alone over the solver-step sweep; speed.json holds every epoch's seconds."""
    if p.width % p.n_heads:
        raise ValueError(f"acssm.speed.width ({p.width}) must be divisible by n_heads ({p.n_heads})")
    import torch

    from models.acssm.scores import to_tensors

    torch.set_num_threads(p.num_threads)
    src = ctx.input("prepare")
    info = read_meta(Path(src))[p.task]
    data = load_split(Path(src), p.task, "train")
    n = min(p.max_series, data["times"].shape[0])
    train = to_tensors({k: v[:n] for k, v in data.items()}, ctx.device)
    horizon = float(np.max(np.where(data["valid"][:n], data["times"][:n], 0.0)))
    res = sweep(info, train, p, horizon, ctx.progress)
    ctx.log_metrics({"acssm_sec_per_epoch": float(np.median(res["acssm_seconds"])),
                     **{f"latent_sde_sec_per_epoch_{s}": float(np.median(v))
                        for s, v in res["latent_sde_seconds"].items()}})
    io.write_json(ctx.out_dir / "speed.json", {
        "task": p.task, "series": n, "points": int(info.points), "horizon": horizon,
        "batch_size": p.batch_size, "train_samples": p.train_samples, "steps": p.steps,
        "claim_steps": p.claim_steps, "threads": p.num_threads, **res})
