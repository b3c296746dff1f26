"""train: the lambda sweep on validation splits, then every model on every data set, one run per seed."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage

from .common import ROTATION_SETS, ColourSettings, Job, RotationSettings, run_name, train_job

RotationModel = Literal["cnn", "gcnn", "partial", "vp"]
ColourModel = Literal["cnn", "ce", "partial", "vp", "vp_bernoulli"]
VARIATIONAL = ("vp", "vp_bernoulli")
COST = {"vp": 8.0, "gcnn": 2.0, "partial": 2.0, "ce": 1.0, "vp_bernoulli": 1.0, "cnn": 0.5}  # rough, for order


class TrainParams(Params):
    seeds: list[int] = Field(min_length=1, description="one run of every model per seed")
    workers: int = Field(gt=0, description="processes running jobs in parallel (one per core)")
    rotation: RotationSettings
    colour: ColourSettings
    rotation_models: list[RotationModel] = Field(min_length=1)
    colour_models: list[ColourModel] = Field(min_length=1)
    sweep_seeds: list[int] = Field(min_length=1, description="seeds of the lambda sweep (not among seeds)")
    lambda_rotation: list[float] = Field(min_length=1, description="VP G-CNN KL weights tried (Digits67-180 val)")
    lambda_colour: list[float] = Field(min_length=1, description="VP-CE regulariser weights tried (colour val)")
    tie_tolerance: float = Field(ge=0, description="sweep: the largest lambda within this of the best val acc")

    @model_validator(mode="after")
    def _check(self):
        if set(self.sweep_seeds) & set(self.seeds):
            raise ValueError("sweep_seeds must differ from seeds (the sweep must not see the final runs)")
        if any(v <= 0 for v in self.lambda_rotation + self.lambda_colour):
            raise ValueError("lambda values must be positive")
        return self


def choose_lambda(rows: list[dict], tolerance: float) -> float:
    """The largest lambda (the closest to the full-group prior) whose mean val accuracy is within
    ``tolerance`` of the best."""
    lams = sorted({r["lam"] for r in rows})
    acc = {lam: float(np.mean([r["accuracy"] for r in rows if r["lam"] == lam])) for lam in lams}
    best = max(acc.values())
    return max(lam for lam in lams if acc[lam] >= best - tolerance)


def sweep_jobs(p: TrainParams, make) -> list[Job]:
    jobs = [make("digits67", "vp", s, lam, "val") for lam in p.lambda_rotation for s in p.sweep_seeds
            if "vp" in p.rotation_models]
    return jobs + [make("colour", m, s, lam, "val") for m in VARIATIONAL if m in p.colour_models
                   for lam in p.lambda_colour for s in p.sweep_seeds]


def final_jobs(p: TrainParams, make, lambdas: dict[str, float]) -> list[Job]:
    jobs = [make(ds, m, s, lambdas.get(f"{ds}_{m}", lambdas.get(m, 0.0)), "test")
            for ds in ROTATION_SETS for m in p.rotation_models for s in p.seeds]
    jobs += [make("colour", m, s, lambdas.get(f"colour_{m}", 0.0), "test") for m in p.colour_models for s in p.seeds]
    return sorted(jobs, key=lambda j: -COST[j.model])  # long jobs first: the workers finish together


@stage(params=TrainParams, inputs=("prepare",), gpu=True)
def train(ctx: StageContext, p: TrainParams) -> None:
    """Lambda by validation, then CNN / G-CNN / Partial / VP (rotations) and CNN / CE / Partial / VP (colour)."""
    data_dir = ctx.input("prepare")
    meta = io.read_json(data_dir / "meta.json")

    def make(dataset: str, model: str, seed: int, lam: float, split: str) -> Job:
        settings = (p.colour if dataset == "colour" else p.rotation).model_dump()
        return Job(dataset, model, seed, lam, split, str(data_dir), settings, meta["n_classes"][dataset],
                   str(ctx.device))

    sweep = ctx.map(train_job, sweep_jobs(p, make), workers=p.workers, desc="lambda sweep")
    table = [{"dataset": r["job"].dataset, "model": r["job"].model, "seed": r["job"].seed, "lam": r["job"].lam,
              "accuracy": r["accuracy"], "mean_subset": r["subset"].mean(0).tolist()} for r in sweep]
    lambdas = {"vp": choose_lambda([r for r in table if r["dataset"] == "digits67"], p.tie_tolerance)} \
        if any(r["dataset"] == "digits67" for r in table) else {}
    for m in VARIATIONAL:
        rows = [r for r in table if r["dataset"] == "colour" and r["model"] == m]
        if rows:
            lambdas[f"colour_{m}"] = choose_lambda(rows, p.tie_tolerance)
    ctx.log_metrics({f"lambda_{k}": v for k, v in lambdas.items()})
    io.write_json(ctx.out_dir / "sweep.json", {"table": table, "chosen": lambdas})

    def log(i, r):
        ctx.log_metrics({f"acc_{run_name(r['job'].dataset, r['job'].model, r['job'].seed)}": r["accuracy"]})

    results = ctx.map(train_job, final_jobs(p, make, lambdas), workers=p.workers, desc="runs", on_result=log)
    summary = []
    for r in results:
        j, name = r["job"], run_name(r["job"].dataset, r["job"].model, r["job"].seed)
        io.save_arrays(ctx.out_dir / "runs" / f"{name}.npz", probs=r["probs"], subset=r["subset"],
                       labels=r["labels"], losses=r["losses"])
        io.save_state(ctx.out_dir / "states" / f"{name}.safetensors", r["state"])
        summary.append({"name": name, "dataset": j.dataset, "model": j.model, "seed": j.seed, "lam": j.lam,
                        "accuracy": r["accuracy"], "invariance_error": r.get("invariance_error")})
    io.write_json(ctx.out_dir / "runs.json", {"seeds": p.seeds, "lambdas": lambdas, "runs": summary})
