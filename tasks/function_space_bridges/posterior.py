"""posterior: a control trained by the relative-entropy SOC loss to steer the reference process to
GP-regression posteriors (amortised over observation sets), per seed."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import ReferenceParams, control_net, reference_process


class PosteriorParams(Params):
    seeds: list[int] = Field(min_length=1)
    workers: int = Field(gt=0)
    grid: int = Field(gt=1, description="grid points (12: the months of the El Nino series)")
    reference: ReferenceParams
    noise_std: float = Field(gt=0, description="observation noise of the regression likelihood")
    context: list[int] = Field(min_length=2, max_length=2, description="observed points per task [min, max]")
    width: int = Field(gt=0)
    depth: int = Field(gt=0)
    time_steps: int = Field(gt=1, description="steps of the controlled SDE")
    steps: int = Field(gt=0, description="Adam steps")
    batch_size: int = Field(gt=0, description="tasks (one path each) per step")
    lr: float = Field(gt=0)


@dataclass(frozen=True)
class PosteriorJob:
    seed: int
    params: dict
    device: str
    train_seed: int  # the global seed + seed: another global seed trains other controls


def train_job(job: PosteriorJob) -> dict:
    import torch

    from models.function_space_bridges.posterior import random_tasks, relative_entropy_loss

    p = PosteriorParams.model_validate(job.params)
    torch.manual_seed(job.train_seed)
    ou = reference_process(p.reference, (p.grid,), job.device)
    net = control_net(p.grid, p.width, p.depth).to(job.device)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.steps)
    curve = []
    for _ in range(p.steps):
        _, y, mask = random_tasks(ou, p.batch_size, tuple(p.context), p.noise_std)
        loss = relative_entropy_loss(net, ou, y, mask, p.noise_std, p.time_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
    return {"seed": job.seed, "state": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "curve": curve}


@stage(params=PosteriorParams, gpu=True)
def posterior(ctx: StageContext, p: PosteriorParams) -> None:
    """Relative-entropy SOC control for GP-regression posteriors (the reference's terminal law is the prior)."""
    jobs = [PosteriorJob(seed, p.model_dump(), str(ctx.device), ctx.seed + seed) for seed in p.seeds]

    def log(i, result):
        for step in range(0, len(result["curve"]), 25):
            chunk = result["curve"][step:step + 25]
            ctx.log_metrics({f"soc_loss_seed{result['seed']}": sum(chunk) / len(chunk)}, step=step)

    results = ctx.map(train_job, jobs, workers=p.workers, desc="seeds", on_result=log)
    for r in results:
        io.save_state(ctx.out_dir / f"seed{r['seed']}/control.safetensors", r["state"])
    io.write_json(ctx.out_dir / "meta.json", {"seeds": p.seeds, "params": p.model_dump()})
    io.write_json(ctx.out_dir / "curves.json", {str(r["seed"]): r["curve"] for r in results})
