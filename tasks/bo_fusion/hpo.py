"""hpo (the paper's stage 1): BO of (log10 lr, batch size) on a lightweight proxy, per variant; then the
transfer check (the full model at a small lr grid and at the chosen lr, per seed)."""
from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from tasks.bo_fusion.common import PreparedMeta, read_prepared, resolve_model_path
from tasks.bo_fusion.outputs import HpoResult, HpoVariant, Hyperparameters, ProxyRun, TransferCheck, TransferRun
from tasks.core import Params, StageContext, stage
from tasks.metrics import macro_f1


class HpoParams(Params):
    variants: list[Literal["full", "lora"]] = Field(min_length=1)
    log10_lr_bounds: dict[str, list[float]] = Field(description="per variant: [low, high] of log10 lr")
    batch_size_bounds: list[int] = Field(min_length=2, max_length=2)
    proxy_frozen_layers: int = Field(ge=0, description="'full' proxy: lower layers frozen (paper: 6 of 12)")
    proxy_lora_rank: int = Field(gt=0, description="'lora' proxy: the reduced LoRA rank")
    lora_rank: int = Field(gt=0, description="LoRA rank of the full 'lora' model")
    lora_alpha: float = Field(gt=0)
    steps: int = Field(gt=0, description="training steps of one proxy run (and of one transfer-check run)")
    eval_every: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    n_initial: int = Field(gt=0, description="Sobol points before BO")
    n_iterations: int = Field(ge=0, description="BO iterations (qLogEI)")
    grid_lrs: list[float] = Field(description="'full' variant: learning rates of the transfer check on the "
                                  "full model (3-5 values; empty: skip)")
    transfer_seeds: list[int] = Field(min_length=1, description="seeds of the transfer check (head init "
                                      "and data order); the proxy search runs once, at the global seed")
    num_restarts: int = Field(gt=0)
    raw_samples: int = Field(gt=0)
    mc_samples: int = Field(gt=0, description="quasi-MC samples of qLogEI")
    maxiter: int = Field(gt=0, description="L-BFGS iterations of the acquisition optimisation")
    gp_fit_maxiter: int | None = Field(gt=0, description="L-BFGS iterations of each GP fit (null: "
                                       "botorch's default)")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.batch_size_bounds
        if not 0 < lo < hi:
            raise ValueError("batch_size_bounds must be [low, high] with 0 < low < high (empty search space)")
        for v in self.variants:
            b = self.log10_lr_bounds.get(v)
            if b is None or len(b) != 2 or not b[0] < b[1]:
                raise ValueError(f"log10_lr_bounds.{v} must be [low, high] with low < high (empty search space)")
        if self.grid_lrs and (len(self.grid_lrs) < 3 or min(self.grid_lrs) <= 0):
            raise ValueError("grid_lrs needs 3-5 positive learning rates (or none)")
        return self


def _build(ctx: StageContext, meta: PreparedMeta, variant: str, frozen_layers: int, rank: int,
           p: HpoParams, seed: int):
    from models.bo_fusion.backbone import build_trainable

    spec = meta.model
    return build_trainable(resolve_model_path(spec.path), len(meta.labels), num_layers=spec.num_layers,
                           variant=variant, frozen_layers=frozen_layers, cache_frozen=spec.cache_frozen,
                           lora_rank=rank, lora_alpha=p.lora_alpha, seed=seed, device=ctx.device)


def _train(module, data, p: HpoParams, lr: float, batch_size: int, seed: int) -> float:
    """Best val macro-F1 of one short run from the module's current weights."""
    from models.bo_fusion.training import finetune_collect

    return finetune_collect(module, data["train"], data["val"], metric=macro_f1, lr=lr, batch_size=batch_size,
                            steps=p.steps, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, seed=seed,
                            eval_every=p.eval_every).best_val_metric


def _proxy_search(ctx: StageContext, p: HpoParams, meta: PreparedMeta, tensors: dict, variant: str,
                  cache) -> HpoVariant:
    """BO (SingleTaskGP + qLogEI, Sobol start) on the variant's proxy; objective = best val macro-F1."""
    import torch

    from models.bo_fusion.backbone import split_batches
    from models.bo_fusion.bo import AcquisitionBudget, maximise_single_objective

    proxy_frozen = p.proxy_frozen_layers if variant == "full" else meta.model.frozen_layers
    rank = p.proxy_lora_rank if variant == "lora" else p.lora_rank
    model = _build(ctx, meta, variant, proxy_frozen, rank, p, ctx.seed)
    data = split_batches(model, tensors, ("train", "val"), cache)
    init = {k: v.clone() for k, v in model.module.state_dict().items()}
    runs: list[ProxyRun] = []

    def objective(x: torch.Tensor) -> float:
        model.module.load_state_dict(init)
        lr, bs = 10 ** float(x[0]), int(x[1])
        best = _train(model.module, data, p, lr, bs, ctx.seed)
        runs.append(ProxyRun(lr=lr, batch_size=bs, best_val_f1=best))
        ctx.log_metrics({f"{variant}_proxy_val_f1": best}, step=len(runs))
        return best

    budget = AcquisitionBudget(num_restarts=p.num_restarts, raw_samples=p.raw_samples, mc_samples=p.mc_samples,
                               maxiter=p.maxiter, fit_maxiter=p.gp_fit_maxiter)
    bounds = torch.tensor([p.log10_lr_bounds[variant], p.batch_size_bounds], dtype=torch.double).T.contiguous()
    t0 = time.perf_counter()
    trace = maximise_single_objective(objective, bounds, n_initial=p.n_initial, n_iterations=p.n_iterations,
                                      seed=ctx.seed, budget=budget,
                                      round_input=lambda x: torch.stack([x[0], x[1].round()]))
    best = int(trace.Y.argmax())
    chosen = Hyperparameters(lr=10 ** float(trace.X[best, 0]), batch_size=int(trace.X[best, 1]))
    return HpoVariant(chosen=chosen, runs=runs, proxy_frozen_layers=proxy_frozen, proxy_lora_rank=rank,
                      seconds=time.perf_counter() - t0, bo_model_seconds=trace.model_seconds,
                      bo_eval_seconds=trace.eval_seconds, transfer=None)


def _transfer_check(ctx: StageContext, p: HpoParams, meta: PreparedMeta, tensors: dict,
                    chosen: Hyperparameters, cache) -> TransferCheck:
    """The full model (not the proxy) at each grid lr and at the chosen lr, same steps, per seed."""
    from models.bo_fusion.backbone import split_batches

    grid, at_chosen = [], []
    for seed in p.transfer_seeds:
        model = _build(ctx, meta, "full", meta.model.frozen_layers, p.lora_rank, p, seed)
        data = split_batches(model, tensors, ("train", "val"), cache)
        init = {k: v.clone() for k, v in model.module.state_dict().items()}
        for lr, runs in [*((lr, grid) for lr in p.grid_lrs), (chosen.lr, at_chosen)]:
            model.module.load_state_dict(init)
            runs.append(TransferRun(seed=seed, lr=lr, best_val_f1=_train(model.module, data, p, lr,
                                                                          chosen.batch_size, seed)))
        ctx.log_metrics({"transfer_val_f1_at_chosen": at_chosen[-1].best_val_f1}, step=seed)
    return TransferCheck(seeds=list(p.transfer_seeds), grid=grid, at_chosen=at_chosen)


@stage(params=HpoParams, inputs=("prepare",), gpu=True)
def hpo(ctx: StageContext, p: HpoParams) -> None:
    """Stage 1: BO of (log10 lr, batch size) on a lightweight proxy; objective = best val macro-F1."""
    from models.bo_fusion.backbone import FrozenFeatureCache, load_classifier

    meta, tensors = read_prepared(ctx)
    spec = meta.model
    cache = FrozenFeatureCache()  # frozen-layer outputs shared by every model built here
    if spec.cache_frozen and 0 < spec.frozen_layers < p.proxy_frozen_layers:
        # the model's cut first, so the proxy's higher cut continues from it instead of starting over
        hf = load_classifier(resolve_model_path(spec.path), len(meta.labels), spec.num_layers).to(ctx.device)
        for s in ("train", "val"):
            cache.features(hf, s, tensors[f"{s}_ids"], tensors[f"{s}_mask"], spec.frozen_layers)
    result = HpoResult(variants={})
    for variant in p.variants:
        out = _proxy_search(ctx, p, meta, tensors, variant, cache)
        if variant == "full" and p.grid_lrs:
            out.transfer = _transfer_check(ctx, p, meta, tensors, out.chosen, cache)
        result.variants[variant] = out
        ctx.log_metrics({f"{variant}_chosen_lr": out.chosen.lr, f"{variant}_chosen_batch_size": out.chosen.batch_size})
    result.write(ctx.out_dir / "hpo.json")
