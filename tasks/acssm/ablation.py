"""acssm ablation: the lambda sweep. ACSSM trained on one task with the weight of the ELBO's control
(KL) term, lambda, at several values, over several seeds; evidence, not a claim.

The paper's objective is the task likelihood plus L_alpha = lambda_1 * 1/2 sum ||alpha_i||^2 dt_i (the
control cost: the KL between the controlled and the prior path measures) + lambda_2 * (-log g), with
official weights lambda_1 = 1e-6, lambda_2 = 1e-8. The sweep sets lambda_1 = lambda and keeps the
official ratio lambda_2 = potential_ratio * lambda (1e-2), so lambda = 1 is the ELBO's own weight of
the control cost. Per value: the test score's mean and 95% t-interval over seeds, the paired change
against the reference value (the official default), and the training control cost at the last epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from tasks.acssm.common import TaskName, load_split, read_meta
from tasks.acssm.training import FitJob, FitResult, TrainSettings, fit_one
from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import t_interval


class AblationParams(Params):
    task: TaskName = Field(description="the one task of the sweep")
    lambdas: list[float] = Field(min_length=2, description="weights of the control cost (lambda_1) swept")
    reference_lambda: float = Field(ge=0, description="the official default (1e-6); one of lambdas; the "
                                    "other values are compared with it, paired per seed")
    potential_ratio: float = Field(ge=0, description="lambda_2 / lambda_1 (official 1e-8 / 1e-6 = 1e-2)")
    seeds: list[int] = Field(min_length=2, description="training seeds per value (a t-interval needs >= 2)")
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(ge=0, description="max grad norm (0 = off)")
    width: int = Field(gt=0)
    state_dim: int = Field(gt=0)
    num_basis: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    time_scale: float = Field(gt=0)
    init_sigma: float = Field(gt=0)
    skip: bool = Field(description="the decoder's skip term from z_k (as in finetune's ACSSM)")
    encoder: Literal["mlp", "cnn"] = Field(description="embedding of image observations (as in finetune)")
    obs_var: float = Field(gt=0)
    train_samples: int = Field(gt=0)
    eval_samples: int = Field(gt=0)
    num_threads: int = Field(gt=0)
    workers: int = Field(gt=0, description="processes training (lambda, seed) runs in parallel")

    @field_validator("lambdas")
    @classmethod
    def _distinct_non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"lambdas must be distinct and >= 0, got {v}")
        return v

    @field_validator("reference_lambda")
    @classmethod
    def _reference_in_sweep(cls, v: float, info: ValidationInfo) -> float:
        if v not in info.data.get("lambdas", [v]):
            raise ValueError(f"reference_lambda ({v}) must be one of lambdas {info.data.get('lambdas')}")
        return v


def settings(p: AblationParams, lam: float) -> TrainSettings:
    model = {k: getattr(p, k) for k in ("width", "state_dim", "num_basis", "n_layers", "n_heads", "dropout",
                                        "time_scale", "init_sigma", "skip", "obs_var", "encoder")}
    return TrainSettings(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                         grad_clip=p.grad_clip, lambda_control=lam, lambda_potential=p.potential_ratio * lam,
                         train_samples=p.train_samples, eval_samples=p.eval_samples,
                         model={**model, "sde_dt": 1.0})        # sde_dt: the latent SDE's only; unused


def summarise(lambdas: list[float], reference: float, scores: dict[float, list[float]],
              control: dict[float, list[float]], higher_is_better: bool) -> list[dict]:
    """Per lambda (in sweep order): the score's mean, 95% t-interval and per-seed values; the paired
    gain over the reference value (accuracy gain or MSE reduction) with its interval; the mean training
    control cost 1/2 sum ||alpha||^2 dt per scored entry at the last epoch."""
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for lam in lambdas:
        mean, low, high = t_interval(scores[lam])
        gains = [sign * (a - b) for a, b in zip(scores[lam], scores[reference])]
        g_mean, g_low, g_high = t_interval(gains)
        rows.append({"lambda": lam, "mean": mean, "ci": [low, high],
                     "per_seed": scores[lam], "n": len(scores[lam]), "gain_vs_reference": g_mean,
                     "gain_ci": [g_low, g_high], "control_cost": float(np.mean(control[lam]))})
    return rows


def draw(ctx: StageContext, sweep: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    lam = np.array([r["lambda"] for r in rows])
    mean = np.array([r["mean"] for r in rows])
    ci = np.array([r["ci"] for r in rows], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].errorbar(lam, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], fmt="o-", capsize=3,
                     label=f"ACSSM, mean and 95% CI over {rows[0]['n']} seeds")
    axes[0].axvline(sweep["reference_lambda"], color="r", lw=0.8, ls="--", label="official default")
    axes[0].set_ylabel(f"test {sweep['metric']}")
    axes[1].plot(lam, [max(r["control_cost"], 1e-12) for r in rows], "s-")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("control cost 1/2 sum |alpha|^2 dt per entry (last epoch)")
    positive = lam[lam > 0]
    for ax in axes:
        if (lam == 0).any():                            # lambda = 0 (no control cost) on a symlog axis
            ax.set_xscale("symlog", linthresh=positive.min() / 10 if positive.size else 1e-6)
        else:
            ax.set_xscale("log")
        ax.set_xlabel("lambda (weight of the control cost; potential weight = "
                      f"{sweep['potential_ratio']:g} x lambda)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"lambda sweep on {sweep['task']}, {sweep['epochs']} epochs", fontsize=8)
    fig.tight_layout()
    ctx.log_figure(fig, "lambda_sweep.png")


@stage(params=AblationParams, inputs=("prepare",), gpu=True)
def ablation(ctx: StageContext, p: AblationParams) -> None:
    """Train ACSSM at every lambda and seed on one task; lambda_sweep.json and its plot."""
    if p.width % p.n_heads:
        raise ValueError(f"acssm.ablation.width ({p.width}) must be divisible by n_heads ({p.n_heads})")
    import torch

    from models.acssm.scores import accuracy, masked_mse, to_tensors

    torch.set_num_threads(p.num_threads)
    src = ctx.input("prepare")
    jobs = [FitJob(p.task, "acssm", s, str(src), str(ctx.out_dir / f"lambda{i}" / f"seed{s}"), str(ctx.device),
                   settings(p, lam)) for i, lam in enumerate(p.lambdas) for s in p.seeds]
    results: list[FitResult] = ctx.map(fit_one, jobs, workers=p.workers, desc="acssm lambda sweep")
    classification = read_meta(Path(src))[p.task].task == "classification"
    test = to_tensors(load_split(Path(src), p.task, "test"))
    scores, control = {lam: [] for lam in p.lambdas}, {lam: [] for lam in p.lambdas}
    for job, res in zip(jobs, results):
        lam = job.settings.lambda_control
        pred = torch.as_tensor(io.load_arrays(Path(job.out_dir) / "test_predictions.npz")["pred"])
        score = (accuracy if classification else masked_mse)(pred, test["target"], test["target_mask"])
        scores[lam].append(score)
        control[lam].append(res.history[-1]["control"])
    rows = summarise(p.lambdas, p.reference_lambda, scores, control, classification)
    for i, r in enumerate(rows):
        ctx.log_metrics({"test_score_mean": r["mean"], "gain_vs_reference": r["gain_vs_reference"],
                         "control_cost": r["control_cost"]}, step=i)
    sweep = {"task": p.task, "metric": "accuracy (higher is better)" if classification else "MSE (lower is better)",
             "epochs": p.epochs, "seeds": p.seeds, "reference_lambda": p.reference_lambda,
             "potential_ratio": p.potential_ratio, "rows": rows}
    io.write_json(ctx.out_dir / "lambda_sweep.json", sweep)
    draw(ctx, sweep)
