"""pretrain: the full-depth DiT, trained from scratch (CPU scale) or loaded from a local folder (paper)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError
from tasks.early_exit_diffusion.common import PretrainedMeta, load_dit, noise_scheduler_config
from tasks.early_exit_diffusion.data import load_prepared


class PretrainParams(Params):
    init: Literal["scratch", "pretrained"] = Field(
        description="scratch: train a small DiT here (CPU); pretrained: from_pretrained(model_dir) (paper)")
    model_dir: str | None = Field(description="paper scale: local DiTTransformer2DModel folder")
    subfolder: str | None = Field(description="e.g. 'transformer' for a DiTPipeline folder")
    num_layers: int = Field(gt=0, description="transformer blocks (scratch)")
    hidden: int = Field(gt=0, description="hidden width (scratch)")
    heads: int = Field(gt=0, description="attention heads (scratch)")
    patch_size: int = Field(gt=0, description="patch side (scratch)")
    steps: int = Field(ge=0, description="training steps from scratch (0 with init: pretrained)")
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(description="after the warm-up: constant, or a cosine "
                                                                   "decay to zero at the last step")
    grad_clip: float | None = Field(gt=0, description="gradient-norm clip; null: none")
    ema_decay: float = Field(gt=0, lt=1)
    label_dropout: float = Field(ge=0, lt=1, description="classifier-free guidance label dropout")
    seeds: list[int] = Field(min_length=1, description="scratch: one base per seed, trained with the global seed "
                                                       "+ this seed; fine-tuning and sampling seed s start from "
                                                       "base s, so the claims' intervals cover base training. "
                                                       "pretrained: the one loaded model serves every seed")
    workers: int = Field(gt=0, description="processes training bases in parallel, one torch thread each "
                                           "(CPU: one per core; GPU: 1)")

    @model_validator(mode="after")
    def _check(self):
        if self.init == "pretrained" and not self.model_dir:
            raise ValueError("init 'pretrained' needs 'model_dir'")
        if self.init == "scratch" and self.steps == 0:
            raise ValueError("init 'scratch' needs steps > 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {self.seeds}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


@stage(params=PretrainParams, inputs=("prepare",), gpu=True)
def pretrain(ctx: StageContext, p: PretrainParams) -> None:
    """The full-depth DiT: one per seed trained from scratch (CPU), or one loaded from a local folder (paper)."""
    from models.early_exit_diffusion import count_parameters

    _, meta = load_prepared(ctx.input("prepare"))
    if p.init == "pretrained":
        model = _load_pretrained(ctx, p, meta.shape)
        model.to("cpu").save_pretrained(ctx.out_dir / "model", safe_serialization=True)
        seeds, final = None, None
    else:
        jobs = [dict(seed=s, train_seed=ctx.seed + s, prepare=str(ctx.input("prepare")), device=str(ctx.device),
                     out=str(ctx.out_dir / f"model_seed{s}"), params=p.model_dump(mode="json")) for s in p.seeds]

        def log(i: int, res: dict) -> None:
            for step, loss in res["curve"]:
                ctx.log_metrics({f"pretrain_loss_seed{res['seed']}": loss}, step=step)

        runs = ctx.map(pretrain_one, jobs, workers=p.workers, desc="pretraining bases (seeds)", on_result=log)
        model = load_dit(ctx.out_dir / f"model_seed{p.seeds[0]}")
        seeds, final = list(p.seeds), [r["final_loss"] for r in runs]
    io.write_json(ctx.out_dir / "meta.json", PretrainedMeta(
        init=p.init, num_layers=len(model.transformer_blocks), parameters=count_parameters(model),
        seeds=seeds, final_loss=final).model_dump(mode="json"))


def _load_pretrained(ctx: StageContext, p: PretrainParams, shape: list[int]):
    if not Path(p.model_dir).is_dir():
        raise MissingInputError(f"'{ctx.paper}.pretrain.model_dir' = '{p.model_dir}' does not exist. Point it "
                                f"at a local DiTTransformer2DModel folder (save_pretrained layout).")
    model = load_dit(Path(p.model_dir), p.subfolder)
    if model.config.in_channels != shape[0] or model.config.sample_size != shape[-1]:
        raise MissingInputError(f"the DiT in '{p.model_dir}' takes {model.config.in_channels}x"
                                f"{model.config.sample_size}^2 inputs but the prepared data is {shape}")
    return model


def pretrain_one(job: dict) -> dict:
    """One base from scratch: DiT init, then the noise-prediction loss at full depth; saves the EMA model.
    Top-level so that worker processes can run it (progress is the stage's bar over bases)."""
    import torch

    from models.early_exit_diffusion import FitConfig, dit_init_, fit_denoiser, make_scheduler, schedule_for, tiny_dit

    p = PretrainParams(**job["params"])
    device = torch.device(job["device"])
    data, meta = load_prepared(Path(job["prepare"]))
    torch.manual_seed(job["train_seed"])
    model = dit_init_(tiny_dit(p.num_layers, p.hidden, p.heads, meta.shape[-1], p.patch_size,
                               meta.shape[0], meta.num_classes))
    x, y = data["x_train"].float().to(device), data["y_train"].to(device)
    model.to(device)
    losses, curve = [], []

    def on_step(i, loss):
        losses.append(loss)
        if i % 50 == 0 or i == p.steps - 1:
            curve.append((i, float(np.mean(losses[-50:]))))

    cfg = FitConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                    warmup_steps=p.warmup_steps, lr_schedule=p.lr_schedule, ema_decay=p.ema_decay,
                    label_dropout=p.label_dropout,
                    freeze_time_embedder=False, grad_clip=p.grad_clip)
    ema = fit_denoiser(model, schedule_for(model, None), make_scheduler("ddpm", **noise_scheduler_config()), x, y,
                       cfg, torch.Generator(device="cpu").manual_seed(job["train_seed"]), on_step=on_step)
    ema.to("cpu").save_pretrained(job["out"], safe_serialization=True)
    return {"seed": job["seed"], "final_loss": float(np.mean(losses[-100:])), "curve": curve}
