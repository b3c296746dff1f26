"""bridge: the resolution-free operator trained by bridge matching with iterative Markovian fitting, for
the 1-D functions and the images, per seed (and the iteration-1 baseline at equal total steps)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import EXPERIMENTS, ExperimentParams, build_operator, load_training_data, reference_process, weights_file


class BridgeParams(Params):
    seeds: list[int] = Field(min_length=1, description="one training run per experiment and seed")
    workers: int = Field(gt=0, description="processes training jobs in parallel (one per core)")
    functions: ExperimentParams
    images: ExperimentParams


@dataclass(frozen=True)
class BridgeJob:
    experiment: str
    seed: int
    prepare_dir: str
    params: dict
    device: str
    train_seed: int  # the global seed + seed: another global seed trains other bridges


def train_job(job: BridgeJob) -> dict:
    """One experiment and seed: the IDBM chain and the baseline; EMA weights and loss curves."""
    import time

    import torch

    from models.function_space_bridges.bridge import TrainConfig, train_idbm

    p = ExperimentParams.model_validate(job.params)
    pi0, pi1, dim, channels = load_training_data(Path(job.prepare_dir), job.experiment)
    torch.manual_seed(1000 * job.train_seed + EXPERIMENTS.index(job.experiment))
    device = torch.device(job.device)
    pi0, pi1 = torch.from_numpy(pi0).to(device), torch.from_numpy(pi1).to(device)
    ou = reference_process(p.reference, tuple(pi0.shape[-dim:]), device)
    cfg = TrainConfig(p.iterations, p.steps_per_iteration, p.batch_size, p.lr, p.ema_decay, p.grad_clip,
                      p.sampling_steps, p.cache_size, p.cache_refresh, p.query_points)
    start = time.perf_counter()
    out = train_idbm(lambda: build_operator(p.operator, dim, channels, device=device), ou, pi0, pi1, cfg)
    states = {k: {n: v.detach().cpu() for n, v in s.items()} for k, s in out["states"].items()}
    n_params = sum(v.numel() for n, v in out["states"]["final"].items() if n != "frequencies")
    return {"experiment": job.experiment, "seed": job.seed, "states": states, "curves": out["curves"],
            "seconds": time.perf_counter() - start, "parameters": n_params}


@stage(params=BridgeParams, inputs=("prepare",), gpu=True)
def bridge(ctx: StageContext, p: BridgeParams) -> None:
    """Bridge matching with IDBM (forward, backward, ..., forward) per experiment and seed."""
    jobs = [BridgeJob(e, s, str(ctx.input("prepare")), getattr(p, e).model_dump(), str(ctx.device), ctx.seed + s)
            for e in ("images", "functions") for s in p.seeds]  # the long jobs first

    def log(i, result):
        tag = f"{result['experiment']}_seed{result['seed']}"
        ctx.log_metrics({f"seconds_{tag}": result["seconds"]})
        for name, curve in result["curves"].items():
            for step in range(0, len(curve), 25):
                ctx.log_metrics({f"loss_{tag}_{name}": sum(curve[step:step + 25]) / len(curve[step:step + 25])},
                                step=step)

    results = ctx.map(train_job, jobs, workers=p.workers, desc="experiment x seed", on_result=log)
    for r in results:
        for model, state in r["states"].items():
            io.save_state(ctx.out_dir / weights_file(r["experiment"], r["seed"], model), state)
    io.write_json(ctx.out_dir / "meta.json", {
        "seeds": p.seeds, "experiments": {e: getattr(p, e).model_dump() for e in EXPERIMENTS},
        "parameters": {r["experiment"]: r["parameters"] for r in results},
        "seconds": {f"{r['experiment']}_seed{r['seed']}": round(r["seconds"], 2) for r in results}})
    io.write_json(ctx.out_dir / "curves.json",
                  {f"{r['experiment']}_seed{r['seed']}": r["curves"] for r in results})
