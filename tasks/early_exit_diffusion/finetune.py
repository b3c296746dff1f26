"""finetune: ASE fine-tuning of the pretrained DiT for its exit schedule, and the ablations, per seed."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tasks.core import Params, StageContext, io, stage
from tasks.early_exit_diffusion.common import (FinetunedMeta, FinetuneRun, base_dir, load_dit,
                                               noise_scheduler_config, variant_schedule)
from tasks.early_exit_diffusion.data import load_prepared


class FinetuneParams(Params):
    schedule: list[int] = Field(description="ASE exit schedule: blocks per t-bin, data end (small t) first")
    variants: list[Literal["ase", "reversed", "full_control", "uniform"]] = Field(
        min_length=1, description="fine-tuned variants: ase (the schedule), reversed (the schedule backwards), "
                                  "full_control (no exits, same steps), uniform (constant round(mean) blocks)")
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(description="after the warm-up: constant, or a cosine "
                                                                   "decay to zero at the last step")
    grad_clip: float | None = Field(gt=0, description="gradient-norm clip; null: none")
    ema_decay: float = Field(gt=0, lt=1)
    label_dropout: float = Field(ge=0, lt=1)
    freeze_time_embedder: bool = Field(description="the paper trains all weights but the timestep embedder")
    seeds: list[int] = Field(min_length=1, description="one fine-tuning run per variant and seed, from seed's "
                                                       "own base (pretrain.seeds) when the bases are trained here")
    workers: int = Field(gt=0, description="processes running (variant, seed) fine-tunings in parallel, "
                                           "one torch thread each (CPU: one per core; GPU: 1)")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v):
        if not isinstance(v, list) or any(isinstance(b, bool) or not isinstance(b, int) for b in v):
            raise ValueError(f"exit schedule must be a list of integer block counts, got {v!r}")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v):
        if "ase" not in v:
            raise ValueError("variants must include 'ase'")
        if len(set(v)) != len(v):
            raise ValueError("variants must not repeat")
        return v


@stage(params=FinetuneParams, inputs=("prepare", "pretrain"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """ASE fine-tuning of the pretrained DiT for its exit schedule (and the ablations), per seed."""
    bases = [base_dir(ctx.input("pretrain"), seed) for seed in p.seeds]  # every seed has a base, before any compute
    base = load_dit(bases[0])
    for v in p.variants:  # validates every schedule against the model before any compute
        variant_schedule(v, base, p.schedule)
    jobs = [dict(seed=seed, variant=v, prepare=str(ctx.input("prepare")), pretrain=str(ctx.input("pretrain")),
                 out=str(ctx.out_dir / f"{v}_seed{seed}"), device=str(ctx.device), params=p.model_dump(mode="json"))
            for seed in p.seeds for v in p.variants]

    def log(i: int, res: dict) -> None:
        for step, loss in res.pop("curve"):
            ctx.log_metrics({f"loss_{res['tag']}": loss}, step=step)

    runs = ctx.map(finetune_one, jobs, workers=p.workers, desc="fine-tuning runs", on_result=log)
    meta = FinetunedMeta(schedule=p.schedule, variants=p.variants, seeds=p.seeds,
                         runs={r["tag"]: FinetuneRun(schedule=r["schedule"], final_loss=r["final_loss"]) for r in runs})
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump(mode="json"))


def finetune_one(job: dict) -> dict:
    """One (variant, seed) fine-tuning run; top-level so that worker processes can run it (progress is
    the stage's bar over runs, from ``ctx.map``)."""
    import torch

    from models.early_exit_diffusion import FitConfig, fit_denoiser, make_scheduler

    p = FinetuneParams(**job["params"])
    seed, name, device = job["seed"], job["variant"], torch.device(job["device"])
    data, _ = load_prepared(Path(job["prepare"]))
    base = load_dit(base_dir(Path(job["pretrain"]), seed)).to(device)
    sched = variant_schedule(name, base, p.schedule)
    x, y = data["x_train"].float().to(device), data["y_train"].to(device)
    cfg = FitConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                    warmup_steps=p.warmup_steps, lr_schedule=p.lr_schedule, ema_decay=p.ema_decay,
                    label_dropout=p.label_dropout,
                    freeze_time_embedder=p.freeze_time_embedder, grad_clip=p.grad_clip)
    tag = f"{name}_seed{seed}"
    torch.manual_seed(seed)
    losses, curve = [], []

    def on_step(i, loss):
        losses.append(loss)
        if i % 50 == 0 or i == p.steps - 1:
            curve.append((i, float(np.mean(losses[-50:]))))

    model = fit_denoiser(base, sched, make_scheduler("ddpm", **noise_scheduler_config()), x, y, cfg,
                         torch.Generator(device="cpu").manual_seed(10_000 + seed), on_step=on_step)
    model.to("cpu").save_pretrained(job["out"], safe_serialization=True)
    return {"tag": tag, "schedule": list(sched.blocks), "final_loss": float(np.mean(losses[-50:])),
            "curve": curve}
