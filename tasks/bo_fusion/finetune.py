"""finetune (the paper's stage 2): fine-tune with the chosen hyperparameters and keep K checkpoints along
the trajectory, per variant and seed."""
from __future__ import annotations

import time
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
    steps: int = Field(gt=0, description="constant-lr training steps (after warm-up)")
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    n_checkpoints: int = Field(ge=2, description="K fusion members")
    reference_step: int = Field(gt=0, description="stands for the paper's early-stopping step")
    window: list[float] = Field(min_length=2, max_length=2, description="[start, end] x reference_step "
                                "(paper: [0.5, 2.0])")
    eval_every: int = Field(gt=0)
    lora_rank: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.window[0] < self.window[1]:
            raise ValueError("window must be [start, end] with 0 < start < end")
        if self.window[1] * self.reference_step > self.steps:
            raise ValueError(f"window end {self.window[1]} x reference_step {self.reference_step} exceeds "
                             f"steps {self.steps}")
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
    """Stage 2: fine-tune with the chosen hyperparameters and keep K checkpoints along the trajectory."""
    from models.bo_fusion.backbone import FrozenFeatureCache, build_trainable, split_batches
    from models.bo_fusion.training import checkpoint_window, finetune_collect

    meta, tensors = read_prepared(ctx)
    hpo = HpoResult.read(ctx.input("hpo") / "hpo.json")
    spec = meta.model
    ckpt_steps = checkpoint_window(p.reference_step, p.n_checkpoints, p.window[0], p.window[1])
    summary = FinetuneResult(checkpoint_steps=ckpt_steps, runs={}, lora_rank=p.lora_rank, lora_alpha=p.lora_alpha)
    cache = FrozenFeatureCache()
    for variant, seed in _jobs(p, hpo):
        chosen = hpo.variants[variant].chosen
        model = build_trainable(resolve_model_path(spec.path), len(meta.labels), num_layers=spec.num_layers,
                                variant=variant, frozen_layers=spec.frozen_layers, cache_frozen=spec.cache_frozen,
                                lora_rank=p.lora_rank, lora_alpha=p.lora_alpha, seed=seed, device=ctx.device)
        data = split_batches(model, tensors, ("train", "val"), cache)
        tag = f"{variant}_seed{seed}"
        t0 = time.perf_counter()
        res = finetune_collect(model.module, data["train"], data["val"], metric=macro_f1, lr=chosen.lr,
                               batch_size=chosen.batch_size, steps=p.steps, warmup_steps=p.warmup_steps,
                               weight_decay=p.weight_decay, seed=seed, eval_every=p.eval_every,
                               checkpoint_steps=ckpt_steps,
                               on_step=lambda s, l, tag=tag: ctx.log_metrics({f"{tag}_train_loss": l}, step=s)
                               if s % 10 == 0 else None)
        seconds = time.perf_counter() - t0
        io.save_state(ctx.out_dir / f"{tag}.safetensors",
                      {f"k{i}.{name}": v for i, c in enumerate(res.checkpoints) for name, v in c.items()})
        summary.runs[tag] = FinetuneRun(variant=variant, seed=seed, lr=chosen.lr, batch_size=chosen.batch_size,
                                        seconds=seconds, val_curve=res.val_curve,
                                        trainable_params=sum(v.numel() for v in res.checkpoints[0].values()))
        for step, f1, loss in res.val_curve:
            ctx.log_metrics({f"{tag}_val_f1": f1, f"{tag}_val_loss": loss}, step=step)
    summary.write(ctx.out_dir / "finetune.json")
