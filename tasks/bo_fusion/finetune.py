"""finetune (the paper's stage 2): fine-tune with the chosen hyperparameters, find the early-stopping step on
validation, and keep K checkpoints from 0.5x to 2x that step at the constant learning rate, per variant and
seed."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.bo_fusion.common import PAPER, read_prepared, resolve_model_path
from tasks.bo_fusion.outputs import FinetuneResult, FinetuneRun, HpoResult
from tasks.core import MissingInputError, Params, StageContext, stage
from tasks.core import io
from tasks.metrics import macro_f1


class FinetuneParams(Params):
    variants: list[Literal["full", "lora"]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1, description="vary data order and head init (stage 1 ran once)")
    lora_seeds: list[int] | None = Field(description="seeds of the 'lora' variant (null: seeds)")
    max_steps: int = Field(gt=0, description="cap on the training steps (early stopping ends sooner)")
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    eval_every: int = Field(gt=0, description="validation every N steps: the early-stopping grid")
    patience: int = Field(gt=0, description="early stopping: evaluations without a better val macro-F1")
    save_every: int = Field(gt=0, description="checkpoint grid in the window (paper: every 50 steps)")
    n_checkpoints: int = Field(ge=2, description="K fusion members, evenly spaced in the window")
    window: list[float] = Field(min_length=2, max_length=2, description="[start, end] x the early-stopping "
                                "step (paper: [0.5, 2.0])")
    lora_rank: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    workers: int = Field(gt=0, description="processes running (variant, seed) runs in parallel, one torch "
                         "thread each (CPU: one per core; GPU: 1)")

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.window[0] < self.window[1]:
            raise ValueError("window must be [start, end] with 0 < start < end")
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every {self.eval_every} exceeds max_steps {self.max_steps}: no evaluation")
        return self


def _jobs(p: FinetuneParams, hpo: HpoResult) -> list[tuple[str, int]]:
    """(variant, seed) pairs, in the order they are trained."""
    jobs = []
    for variant in p.variants:
        if variant not in hpo.variants:
            raise MissingInputError(f"hpo did not search variant '{variant}'; add it to "
                                    f"'{PAPER}.hpo.variants'.")
        jobs += [(variant, s) for s in ((p.lora_seeds or p.seeds) if variant == "lora" else p.seeds)]
    return jobs


@stage(params=FinetuneParams, inputs=("prepare", "hpo"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """Stage 2: early stopping on val macro-F1 finds best_step; K checkpoints from 0.5x to 2x best_step."""
    hpo = HpoResult.read(ctx.input("hpo") / "hpo.json")
    jobs = [dict(variant=v, seed=s, chosen=hpo.variants[v].chosen.model_dump(), prepare=str(ctx.input("prepare")),
                 out=str(ctx.out_dir), device=str(ctx.device), params=p.model_dump(mode="json"))
            for v, s in _jobs(p, hpo)]

    def log(i: int, res: dict) -> None:
        tag = res["tag"]
        for step, loss in res.pop("train_loss"):
            ctx.log_metrics({f"{tag}_train_loss": loss}, step=step)
        for step, f1, loss in res["run"]["val_curve"]:
            ctx.log_metrics({f"{tag}_val_f1": f1, f"{tag}_val_loss": loss}, step=step)
        ctx.log_metrics({f"{tag}_best_step": res["run"]["best_step"]})

    runs = ctx.map(finetune_one, jobs, workers=p.workers, desc="fine-tuning runs", on_result=log)
    summary = FinetuneResult(runs={r["tag"]: FinetuneRun.model_validate(r["run"]) for r in runs},
                             lora_rank=p.lora_rank, lora_alpha=p.lora_alpha)
    summary.write(ctx.out_dir / "finetune.json")


def finetune_one(job: dict) -> dict:
    """One (variant, seed) run; top-level so that worker processes can run it. Writes the K checkpoints
    as '<tag>.safetensors' ('k<i>.<name>' tensors) into the stage's output folder."""
    from models.bo_fusion.backbone import FrozenFeatureCache, build_trainable, split_batches
    from models.bo_fusion.training import finetune_early_stopping

    p = FinetuneParams(**job["params"])
    meta, tensors = read_prepared(Path(job["prepare"]))
    variant, seed, lr, bs = job["variant"], job["seed"], job["chosen"]["lr"], job["chosen"]["batch_size"]
    spec = meta.model
    model = build_trainable(resolve_model_path(spec.path), len(meta.labels), num_layers=spec.num_layers,
                            variant=variant, frozen_layers=spec.frozen_layers, cache_frozen=spec.cache_frozen,
                            lora_rank=p.lora_rank, lora_alpha=p.lora_alpha, seed=seed, device=job["device"])
    data = split_batches(model, tensors, ("train", "val"), FrozenFeatureCache())
    tag, losses = f"{variant}_seed{seed}", []
    t0 = time.perf_counter()
    res = finetune_early_stopping(
        model.module, data["train"], data["val"], metric=macro_f1, lr=lr, batch_size=bs, max_steps=p.max_steps,
        warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, seed=seed, eval_every=p.eval_every,
        patience=p.patience, save_every=p.save_every, n_checkpoints=p.n_checkpoints, window=(p.window[0], p.window[1]),
        on_step=lambda s, l: losses.append((s, l)) if s % 10 == 0 else None)
    seconds = time.perf_counter() - t0
    io.save_state(Path(job["out"]) / f"{tag}.safetensors",
                  {f"k{i}.{name}": v.cpu() for i, c in enumerate(res.checkpoints) for name, v in c.items()})
    run = FinetuneRun(variant=variant, seed=seed, lr=lr, batch_size=bs, seconds=seconds, val_curve=res.val_curve,
                      best_step=res.best_step, best_val_f1=res.best_val_metric, stop_step=res.stop_step,
                      last_step=res.last_step, window=list(res.window), checkpoint_steps=res.checkpoint_steps,
                      truncated=res.truncated, trainable_params=sum(v.numel() for v in res.checkpoints[0].values()))
    return {"tag": tag, "run": run.model_dump(mode="json"), "train_loss": losses}
