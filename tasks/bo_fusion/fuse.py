"""fuse: BOMF (two-objective BO over simplex weights, Sec. 4.3) and the baselines, per variant and seed."""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from tasks.bo_fusion.common import read_prepared, resolve_model_path
from tasks.bo_fusion.outputs import (FinetuneResult, FuseResult, FuseRun, FuseTiming, LandscapePoint,
                                     MemberScores, MethodScores)
from tasks.core import Params, StageContext, stage
from tasks.core import io
from tasks.metrics import macro_f1


class FuseParams(Params):
    n_initial: int | None = Field(gt=0, description="Sobol points (null: K, as the paper)")
    n_iterations: int = Field(gt=0, description="BO iterations of BOMF and of each single-objective BO")
    mc_samples: int = Field(gt=0)
    num_restarts: int = Field(gt=0)
    raw_samples: int = Field(gt=0)
    gp_fit_maxiter: int | None = Field(gt=0, description="L-BFGS iterations of each GP fit (null: "
                                       "botorch's default)")
    maxiter: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    workers: int = Field(gt=0, description="processes fusing (variant, seed) runs in parallel, one torch "
                         "thread each (CPU: one per core; GPU: 1)")


def _load_members(path: Path, k: int, device) -> list[dict]:
    """The K checkpoints saved by finetune as 'k<i>.<name>' tensors."""
    members = [dict() for _ in range(k)]
    for key, v in io.load_state(path, device).items():
        i, name = key.split(".", 1)
        members[int(i[1:])][name] = v
    return members


class ValidationScores:
    """(macro-F1, loss) of fused weights on one split (val, or test), each distinct weight vector evaluated
    once and timed."""

    def __init__(self, fused, data, batch_size: int):
        self.fused, self.data, self.batch_size = fused, data, batch_size
        self.scores: dict[tuple, tuple[float, float]] = {}
        self.seconds = 0.0

    def __call__(self, w) -> tuple[float, float]:
        key = tuple(round(v, 8) for v in w.tolist())
        if key not in self.scores:
            t = time.perf_counter()
            self.scores[key] = self.fused.evaluate(w.float(), self.data, self.batch_size)
            self.seconds += time.perf_counter() - t
        return self.scores[key]

    def landscape(self) -> list[LandscapePoint]:
        return [LandscapePoint(f1=v[0], loss=v[1], kind="member" if sum(1 for x in key if x > 0) == 1 else "fused")
                for key, v in self.scores.items()]


def _pick(p: FuseParams, val_of: ValidationScores, k: int, seed: int):
    """The fused weights of every method, the BOMF trace and the timings."""
    import torch

    from models.bo_fusion.bo import (AcquisitionBudget, maximise_single_objective, maximise_two_objectives,
                                     sobol_points)
    from models.bo_fusion.fusion import bomf_objectives, greedy_soup, simplex_weights

    budget = AcquisitionBudget(num_restarts=p.num_restarts, raw_samples=p.raw_samples, mc_samples=p.mc_samples,
                               maxiter=p.maxiter, fit_maxiter=p.gp_fit_maxiter)
    n_init = p.n_initial or k
    eye = torch.eye(k)
    member_val = [val_of(eye[i]) for i in range(k)]
    f1s, losses = [m[0] for m in member_val], [m[1] for m in member_val]

    def objectives(alpha: torch.Tensor) -> list[float]:
        return bomf_objectives(*val_of(simplex_weights(alpha)), f1s, losses)  # Sec. 4.3: [metric, -loss]

    bounds = torch.stack([torch.zeros(k), torch.ones(k)]).double()
    x0 = sobol_points(bounds, n_init, seed)
    best_member = max(range(k), key=lambda i: (f1s[i], -losses[i]))
    picks = {"best_checkpoint": eye[best_member], "last_checkpoint": eye[k - 1],
             "uniform_average": torch.full((k,), 1.0 / k),
             "greedy_soup": greedy_soup(lambda w: val_of(w)[0], f1s)[0]}
    bo_time, single = {}, {}
    t0 = time.perf_counter()
    mo = maximise_two_objectives(objectives, bounds, [0.0, 0.0], n_initial=n_init, n_iterations=p.n_iterations,
                                 seed=seed, budget=budget, initial_X=x0)
    bo_time["bomf"] = time.perf_counter() - t0
    mo_w = simplex_weights(mo.X.float())
    mo_val = [val_of(w) for w in mo_w]
    picks["bomf"] = mo_w[max(range(len(mo_w)), key=lambda i: (mo_val[i][0], -mo_val[i][1]))]
    for name, idx in (("metric_only_bo", 0), ("loss_only_bo", 1)):
        t0 = time.perf_counter()
        trace = maximise_single_objective(lambda a, idx=idx: objectives(a)[idx], bounds, n_initial=n_init,
                                          n_iterations=p.n_iterations, seed=seed, budget=budget, initial_X=x0)
        bo_time[name] = time.perf_counter() - t0
        picks[name] = simplex_weights(trace.X.float())[int(trace.Y.argmax())]  # each picks by its own objective
        single[name] = {"model_seconds": trace.model_seconds, "eval_seconds": trace.eval_seconds}
    return picks, (f1s, losses), mo, bo_time, single


def fuse_one(job: dict) -> dict:
    """BOMF and the baselines on one (variant, seed) run's checkpoints; top-level so that worker
    processes can run it."""
    from models.bo_fusion.backbone import FrozenFeatureCache, build_trainable, split_batches
    from models.bo_fusion.bo import pareto_mask
    from models.bo_fusion.fusion import FusedClassifier, majority_metric

    p = FuseParams(**job["params"])
    meta, tensors = read_prepared(Path(job["prepare"]))
    ft, spec, tag = FinetuneResult.read(Path(job["finetune"]) / "finetune.json"), meta.model, job["tag"]
    run = ft.runs[tag]
    model = build_trainable(resolve_model_path(spec.path), len(meta.labels), num_layers=spec.num_layers,
                            variant=run.variant, frozen_layers=spec.frozen_layers, cache_frozen=spec.cache_frozen,
                            lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha, seed=run.seed, device=job["device"])
    data = split_batches(model, tensors, ("val", "test"), FrozenFeatureCache())
    members = _load_members(Path(job["finetune"]) / f"{tag}.safetensors", len(run.checkpoint_steps), job["device"])
    fused = FusedClassifier(model.module, members, macro_f1)
    val_of = ValidationScores(fused, data["val"], p.eval_batch_size)
    picks, (f1s, losses), mo, bo_time, single = _pick(p, val_of, len(members), run.seed)
    rows, test_of = {}, ValidationScores(fused, data["test"], p.eval_batch_size)  # same weights: scored once
    for name, w in picks.items():
        (vf1, vloss), (tf1, tloss) = val_of(w), test_of(w)
        rows[name] = MethodScores(val_f1=vf1, val_loss=vloss, test_f1=tf1, test_loss=tloss, weights=w.tolist())
    timing = FuseTiming(bomf_model_seconds=mo.model_seconds, bomf_eval_seconds=mo.eval_seconds,
                        bo_total_seconds=bo_time, single_objective=single,
                        val_eval_seconds_total=val_of.seconds, val_evaluations=len(val_of.scores))
    out = FuseRun(variant=run.variant, seed=run.seed, methods=rows, best_step=run.best_step,
                  early_stop_val_f1=run.best_val_f1,
                  majority_val_f1=majority_metric(data["val"].labels, len(meta.labels), macro_f1),
                  members_val=[MemberScores(step=s, f1=f, loss=l) for s, f, l in zip(run.checkpoint_steps, f1s, losses)],
                  landscape=val_of.landscape(), bomf_Y=mo.Y.tolist(), bomf_pareto=pareto_mask(mo.Y).tolist(),
                  hypervolume=mo.hypervolume, timing=timing)
    return {"tag": tag, "run": out.model_dump(mode="json")}


@stage(params=FuseParams, inputs=("prepare", "finetune"), gpu=True)
def fuse(ctx: StageContext, p: FuseParams) -> None:
    """BOMF (two-objective BO over simplex weights) and the baselines, per variant and seed."""
    ft = FinetuneResult.read(ctx.input("finetune") / "finetune.json")
    jobs = [dict(tag=tag, prepare=str(ctx.input("prepare")), finetune=str(ctx.input("finetune")),
                 device=str(ctx.device), params=p.model_dump(mode="json")) for tag in ft.runs]

    def log(i: int, res: dict) -> None:
        tag, run = res["tag"], FuseRun.model_validate(res["run"])
        ctx.log_metrics({f"{tag}_{name}_{k}": getattr(m, k) for name, m in run.methods.items()
                         for k in ("test_f1", "val_f1")})
        for step, hv in enumerate(run.hypervolume):
            ctx.log_metrics({f"{tag}_hypervolume": hv}, step=step)

    runs = ctx.map(fuse_one, jobs, workers=p.workers, desc="fusion runs", on_result=log)
    FuseResult(runs={r["tag"]: FuseRun.model_validate(r["run"]) for r in runs}).write(ctx.out_dir / "fuse.json")
