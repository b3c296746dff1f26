"""metatrain: the per-weight kinetic MLP of L2E by antithetic ES on the task family; the output
multiplier chosen on the fixed meta-validation tasks after a short screen of every candidate (screened
in parallel worker processes), then the chosen one trained on."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .family import TaskArrays, family_task, load_task


def to_task(task: TaskArrays, device=None):
    """The model-side Task (torch tensors on ``device``) of train / validation arrays."""
    import torch

    from models.l2e_sgmcmc.meta import Task

    t = lambda k: torch.as_tensor(task.arrays[k]).to(device)
    return Task(task.name, task.spec(), t("x_train"), t("y_train"), t("x_val"), t("y_val"))


class MetatrainParams(Params):
    hidden: int = Field(gt=0, description="width of the per-weight MLP 9 -> hidden -> hidden -> 2")
    multipliers: list[float] = Field(min_length=1, description="candidate exp_mult = precond_mult")
    screen_iterations: int = Field(ge=1, description="outer iterations of every candidate before choosing")
    iterations: int = Field(ge=1, description="outer iterations of the chosen multiplier (screen included)")
    eval_every: int = Field(gt=0, description="meta-validation every this many outer iterations")
    pairs: int = Field(gt=0, description="antithetic pairs per outer iteration")
    sigma: float = Field(gt=0)
    lr: float = Field(gt=0, description="Adam learning rate of the meta-parameters")
    clip: float = Field(gt=0, description="gradient-norm clip of the ES estimate")
    unroll: int = Field(gt=0, description="inner sampler steps per meta-loss")
    batch_size: int = Field(gt=0)
    samples: int = Field(gt=0, description="thinned samples of the BMA meta-loss")
    sample_window: int = Field(gt=0, description="the samples are thinned from the last this many steps")
    step_mult: float = Field(gt=0, description="eps = sqrt(step_mult / N)")
    friction: float = Field(gt=0, description="C")
    temperature: float = Field(gt=0, description="noise variance multiplier (1: the paper's N(0, 2 C eps))")
    weight_decay: float = Field(ge=0)
    loss_cap: float = Field(gt=0, description="normalised NLL given to a diverged sampler")
    workers: int = Field(gt=0, description="processes screening the candidate multipliers")


def meta_config(p: MetatrainParams, multiplier: float):
    from models.l2e_sgmcmc.meta import MetaConfig

    keys = ("hidden", "pairs", "sigma", "lr", "clip", "unroll", "batch_size", "samples", "sample_window",
            "step_mult", "friction", "temperature", "weight_decay", "loss_cap")
    return MetaConfig(multiplier=multiplier, **{k: getattr(p, k) for k in keys})


@dataclass(frozen=True)
class Run:
    """One trainer's stretch of outer iterations [start, stop) on the task stream seeded ``stream_seed``."""

    params: dict
    multiplier: float
    data_dir: str
    seed: int
    stream_seed: int
    device: str
    start: int
    stop: int
    state: dict | None = None


def train_run(run: Run, on_eval=None) -> dict:
    """Outer iterations of one trainer with meta-validation every eval_every and at the end; returns
    the trainer's state and its meta-validation curve (the untrained score first when start = 0)."""
    from pathlib import Path

    from models.l2e_sgmcmc.meta import MetaTrainer

    p = MetatrainParams.model_validate(run.params)
    data = Path(run.data_dir)
    meta = io.read_json(data / "meta.json")
    metaval = [to_task(load_task(data / "metaval", e), run.device) for e in meta["metaval"]]
    trainer = MetaTrainer(meta_config(p, run.multiplier), run.seed, run.device)
    if run.state is not None:
        trainer.load(run.state, run.stream_seed)
    rng = np.random.default_rng(run.stream_seed)
    curve, losses = [], []
    if run.start == 0:
        curve.append({"iteration": 0, "score": trainer.validation_score(metaval, run.seed)})
    for it in range(run.start, run.stop):
        task = to_task(family_task(rng, meta["family"], meta["val_fraction"], meta["test_fraction"],
                                   meta["data_dir"]), run.device)
        losses.append(trainer.step(task))
        if (it + 1) % p.eval_every == 0 or it + 1 == run.stop:
            curve.append({"iteration": it + 1, "score": trainer.validation_score(metaval, run.seed)})
            if on_eval:
                on_eval(curve[-1], float(np.mean(losses[-p.eval_every:])))
    return {"multiplier": run.multiplier, "state": trainer.state(), "curve": curve, "es_losses": losses}


@stage(params=MetatrainParams, inputs=("prepare",), gpu=True)
def metatrain(ctx: StageContext, p: MetatrainParams) -> None:
    """Meta-train the L2E sampler (ES on the BMA meta-loss); choose the output multiplier."""
    from models.l2e_sgmcmc.meta import MetaTrainer

    data, device = str(ctx.input("prepare")), str(ctx.device)
    screen = min(p.screen_iterations, p.iterations) if len(p.multipliers) > 1 else 0
    started = time.perf_counter()
    run = lambda m, start, stop, state=None, stream=ctx.seed: Run(p.model_dump(), m, data, ctx.seed, stream,
                                                                 device, start, stop, state)
    screened = {}
    if screen:  # every candidate sees the same task sequence and the same randomness
        jobs = [run(m, 0, screen) for m in p.multipliers]
        screened = {r["multiplier"]: r for r in ctx.map(train_run, jobs, workers=p.workers, desc="screen")}
        chosen = min(p.multipliers, key=lambda m: screened[m]["curve"][-1]["score"])
    else:
        chosen = p.multipliers[0]

    def log(row, es_loss):
        ctx.log_metrics({"meta_val": row["score"], "es_loss": es_loss}, step=row["iteration"])

    state = screened[chosen]["state"] if screen else None
    rest = train_run(run(chosen, screen, p.iterations, state, ctx.seed + 1), on_eval=log)
    seconds = time.perf_counter() - started
    curves = [{**row, "multiplier": m, "phase": "screen"} for m, r in screened.items() for row in r["curve"]]
    curves += [{**row, "multiplier": chosen, "phase": "train"} for row in rest["curve"]]
    untrained = MetaTrainer(meta_config(p, chosen), ctx.seed).phi.detach()
    io.save_state(ctx.out_dir / "kinetic.safetensors", {"trained": rest["state"]["phi"], "untrained": untrained})
    io.write_json(ctx.out_dir / "meta.json", {
        "hidden": p.hidden, "multiplier": chosen, "step_mult": p.step_mult, "friction": p.friction,
        "temperature": p.temperature, "weight_decay": p.weight_decay, "screen_iterations": screen,
        "screen": {f"{m:g}": r["curve"][-1]["score"] for m, r in screened.items()},
        "iterations": p.iterations, "seconds": seconds,
        "meta_val_final": rest["curve"][-1]["score"],
        "outer_iterations_run": screen * len(p.multipliers) + p.iterations - screen})
    io.write_json(ctx.out_dir / "curves.json", curves)
    ctx.log_metrics({"chosen_multiplier": chosen, "meta_val_final": rest["curve"][-1]["score"]})
