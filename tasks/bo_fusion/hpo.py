"""hpo (the paper's stage 1): BO of (log10 lr, batch size) on a lightweight proxy, per variant; then the
transfer check (the full model at a small lr grid and at the chosen lr, per seed)."""
from __future__ import annotations

import time
from pathlib import Path
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
    workers: int = Field(gt=0, description="processes running the proxy searches (one per variant) and the "
                         "transfer-check runs in parallel, one torch thread each (CPU: one per core; GPU: 1)")

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


def _build(job: dict, meta: PreparedMeta, variant: str, frozen_layers: int, rank: int, p: HpoParams, seed: int):
    from models.bo_fusion.backbone import build_trainable

    spec = meta.model
    return build_trainable(resolve_model_path(spec.path), len(meta.labels), num_layers=spec.num_layers,
                           variant=variant, frozen_layers=frozen_layers, cache_frozen=spec.cache_frozen,
                           lora_rank=rank, lora_alpha=p.lora_alpha, seed=seed, device=job["device"])


def _train(module, data, p: HpoParams, lr: float, batch_size: int, seed: int) -> float:
    """Best val macro-F1 of one short run from the module's current weights."""
    from models.bo_fusion.training import finetune_collect

    return finetune_collect(module, data["train"], data["val"], metric=macro_f1, lr=lr, batch_size=batch_size,
                            steps=p.steps, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, seed=seed,
                            eval_every=p.eval_every).best_val_metric


def proxy_search_one(job: dict) -> dict:
    """BO (SingleTaskGP + qLogEI, Sobol start) on one variant's proxy; objective = best val macro-F1.
    Top-level so that worker processes can run it."""
    import torch

    from models.bo_fusion.backbone import FrozenFeatureCache, split_batches
    from models.bo_fusion.bo import AcquisitionBudget, maximise_single_objective

    p, variant, seed = HpoParams(**job["params"]), job["variant"], job["seed"]
    meta, tensors = read_prepared(Path(job["prepare"]))
    proxy_frozen = p.proxy_frozen_layers if variant == "full" else meta.model.frozen_layers
    rank = p.proxy_lora_rank if variant == "lora" else p.lora_rank
    model = _build(job, meta, variant, proxy_frozen, rank, p, seed)
    data = split_batches(model, tensors, ("train", "val"), FrozenFeatureCache())
    init = {k: v.clone() for k, v in model.module.state_dict().items()}
    runs: list[ProxyRun] = []

    def objective(x: torch.Tensor) -> float:
        model.module.load_state_dict(init)
        lr, bs = 10 ** float(x[0]), int(x[1])
        runs.append(ProxyRun(lr=lr, batch_size=bs, best_val_f1=_train(model.module, data, p, lr, bs, seed)))
        return runs[-1].best_val_f1

    budget = AcquisitionBudget(num_restarts=p.num_restarts, raw_samples=p.raw_samples, mc_samples=p.mc_samples,
                               maxiter=p.maxiter, fit_maxiter=p.gp_fit_maxiter)
    bounds = torch.tensor([p.log10_lr_bounds[variant], p.batch_size_bounds], dtype=torch.double).T.contiguous()
    t0 = time.perf_counter()
    trace = maximise_single_objective(objective, bounds, n_initial=p.n_initial, n_iterations=p.n_iterations,
                                      seed=seed, budget=budget, round_input=lambda x: torch.stack([x[0], x[1].round()]))
    best = int(trace.Y.argmax())
    chosen = Hyperparameters(lr=10 ** float(trace.X[best, 0]), batch_size=int(trace.X[best, 1]))
    return HpoVariant(chosen=chosen, runs=runs, proxy_frozen_layers=proxy_frozen, proxy_lora_rank=rank,
                      seconds=time.perf_counter() - t0, bo_model_seconds=trace.model_seconds,
                      bo_eval_seconds=trace.eval_seconds, transfer=None).model_dump(mode="json")


def transfer_run_one(job: dict) -> list[dict]:
    """The full model (not the proxy) trained like a proxy run at each of ``job["lrs"]``, from one seed:
    built and its frozen features cached once, then every run starts from the same weights and torch RNG
    state, as if the model had been built afresh for it. Top-level for workers."""
    import torch

    from models.bo_fusion.backbone import FrozenFeatureCache, split_batches

    p = HpoParams(**job["params"])
    meta, tensors = read_prepared(Path(job["prepare"]))
    model = _build(job, meta, "full", meta.model.frozen_layers, p.lora_rank, p, job["seed"])
    data = split_batches(model, tensors, ("train", "val"), FrozenFeatureCache())
    init = {k: v.clone() for k, v in model.module.state_dict().items()}
    rng = torch.get_rng_state()
    out = []
    for lr in job["lrs"]:
        model.module.load_state_dict(init)
        torch.set_rng_state(rng)
        out.append(TransferRun(seed=job["seed"], lr=lr, best_val_f1=_train(model.module, data, p, lr,
                                                                           job["batch_size"], job["seed"])).model_dump())
    return out


@stage(params=HpoParams, inputs=("prepare",), gpu=True)
def hpo(ctx: StageContext, p: HpoParams) -> None:
    """Stage 1: BO of (log10 lr, batch size) on a lightweight proxy; objective = best val macro-F1. Then
    the transfer check: the full model at the lr grid and at the chosen lr, per transfer seed."""
    from models.bo_fusion.fusion import majority_metric

    meta, tensors = read_prepared(ctx)
    base = dict(prepare=str(ctx.input("prepare")), device=str(ctx.device), params=p.model_dump(mode="json"))
    found = ctx.map(proxy_search_one, [dict(base, variant=v, seed=ctx.seed) for v in p.variants],
                    workers=p.workers, desc="proxy searches")
    result = HpoResult(variants={v: HpoVariant.model_validate(r) for v, r in zip(p.variants, found)})
    for v, out in result.variants.items():
        for i, r in enumerate(out.runs, start=1):
            ctx.log_metrics({f"{v}_proxy_val_f1": r.best_val_f1}, step=i)
        ctx.log_metrics({f"{v}_chosen_lr": out.chosen.lr, f"{v}_chosen_batch_size": out.chosen.batch_size})
    full = result.variants.get("full")
    if full is not None and p.grid_lrs:
        jobs = [dict(base, seed=s, lrs=[*p.grid_lrs, full.chosen.lr], batch_size=full.chosen.batch_size)
                for s in p.transfer_seeds]  # one job per seed: the grid, then the chosen lr
        runs = ctx.map(transfer_run_one, jobs, workers=p.workers, desc="transfer check")
        full.transfer = TransferCheck(
            seeds=list(p.transfer_seeds), grid=[TransferRun(**r) for rs in runs for r in rs[:-1]],
            at_chosen=[TransferRun(**rs[-1]) for rs in runs],
            majority_val_f1=majority_metric(tensors["val_labels"].long(), len(meta.labels), macro_f1))
        for r in full.transfer.at_chosen:
            ctx.log_metrics({"transfer_val_f1_at_chosen": r.best_val_f1}, step=r.seed)
    result.write(ctx.out_dir / "hpo.json")
