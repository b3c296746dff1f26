"""sample: every method on every held-out task and split (tuned on validation, scored on test), and the
time per step of L2E vs SGHMC on the held-out models."""
from __future__ import annotations

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .methods import TaskJob, run_task, timing_rows


class SampleParams(Params):
    steps: int = Field(gt=0, description="gradient evaluations per chain (every method)")
    burn_in: int = Field(ge=0, description="L2E / SGHMC: samples are thinned after this step")
    samples: int = Field(gt=0, description="samples per chain; deep-ensemble members")
    chains: int = Field(ge=2, description="chains per task and split (R-hat needs two)")
    batch_size: int = Field(gt=0)
    l2e_step_mults: list[float] = Field(min_length=1, description="L2E step_mult grid (tuned on validation)")
    sghmc_step_mults: list[float] = Field(min_length=1, description="SGHMC learning rate eps^2 N (grid)")
    sghmc_momentum_decay: float = Field(gt=0, lt=1, description="SGHMC / cSGHMC friction per step eps C")
    csghmc_step_mults: list[float] = Field(min_length=1)
    csghmc_cycles: list[int] = Field(min_length=1, description="cycles; each must divide samples")
    csghmc_temperatures: list[float] = Field(min_length=1)
    explore_fraction: float = Field(ge=0, lt=1, description="cSGHMC: noise-free share of each cycle")
    ensemble_lrs: list[float] = Field(min_length=1, description="Adam learning rates of the deep ensemble")
    barrier_points: int = Field(ge=3, description="points on the straight path between two samples")
    barrier_delta: float = Field(gt=0, description="two samples share a mode below this barrier (nats)")
    mixing_weights: int = Field(gt=0, description="first weights whose R-hat and ESS are reported")
    timing_steps: int = Field(gt=0)
    timing_repeats: int = Field(ge=2)
    workers: int = Field(gt=0, description="processes running task x split jobs")


@stage(params=SampleParams, inputs=("prepare", "metatrain"), gpu=True)
def sample(ctx: StageContext, p: SampleParams) -> None:
    """L2E (trained, untrained), SGHMC, tuned cSGHMC and deep ensembles on the held-out tasks."""
    for c in p.csghmc_cycles:
        if p.samples % c:
            raise ValueError(f"l2e_sgmcmc.sample.csghmc_cycles: {c} cycles do not divide {p.samples} samples")
    data, trained = ctx.input("prepare"), ctx.input("metatrain")
    heldout = io.read_json(data / "meta.json")["heldout"]
    kinetic = io.read_json(trained / "meta.json")
    job = lambda entry, i: TaskJob(p.model_dump(), entry, str(data), str(trained / "kinetic.safetensors"),
                                   kinetic, ctx.seed + i, str(ctx.device))
    jobs = [job(e, i) for i, e in enumerate(heldout)]
    rows = ctx.map(run_task, jobs, workers=p.workers, desc="tasks x splits")
    timing = {}
    first_split = [j for j in jobs if j.entry["split"] == heldout[0]["split"]]
    for j in ctx.progress(first_split, desc="timing"):  # in this process alone: no worker competes
        timing[j.entry["task"]] = timing_rows(j)
    for r in rows:
        ctx.log_metrics({f"{r['name']}_{m}_nll": sum(c["nll"] for c in v["chains"]) / len(v["chains"])
                         for m, v in r["methods"].items()})
    io.write_json(ctx.out_dir / "runs.json", {"rows": rows, "timing": timing, "device": str(ctx.device),
                                              "chosen_multiplier": kinetic["multiplier"]})
