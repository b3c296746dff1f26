"""learn_symmetry: orthonormal generator heads trained to minimise the KdV validity score, per seed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import DataMeta, generator_file, load_split, sample_patches


class LearnSymmetryParams(Params):
    seeds: list[int] = Field(min_length=1, description="one generator network per seed")
    n_generators: int = Field(gt=0, description="heads (generators) of the network")
    width: int = Field(gt=0, description="trunk width")
    head_width: int = Field(gt=0, description="hidden width of each head")
    steps: int = Field(gt=0, description="Adam steps (learning rate x0.1 at half)")
    lr: float = Field(gt=0)
    sigma: float = Field(gt=0, description="flow magnitude alpha ~ U(0, sigma), random sign")
    rk4_steps: int = Field(gt=0, description="RK4 steps of one flow")
    lipschitz_weight: float = Field(ge=0)
    lipschitz_tau: float = Field(gt=0, description="hinge of the finite-difference quotient")
    sobolev_weight: float = Field(ge=0, description="weight of the H^2 (Sobolev) penalty")
    sobolev_fraction: float = Field(ge=0, le=1, description="last fraction of the steps with the Sobolev term on")
    threshold: float = Field(gt=0, description="th of log max(|residual|, th)")
    patch_size: int = Field(ge=8, description="t x x patch side (points)")
    batch_patches: int = Field(gt=0, description="patches per step")
    reference_patches: int = Field(gt=0, description="training patches on which the final A is fixed")
    workers: int = Field(gt=0, description="processes training seeds in parallel (one per core)")


@dataclass(frozen=True)
class SeedJob:
    seed: int
    data_dir: str
    params: dict


def train_seed(job: SeedJob) -> dict:
    """Train one seed's generators (float64: the floor of the least-squares fit is lower than in float32)
    and return its state and loss curve."""
    import torch

    from models.symmetry_generators.generators import GeneratorNet, TrainConfig, fit_generators

    p = LearnSymmetryParams.model_validate(job.params)
    folder = Path(job.data_dir)
    grid = DataMeta.read(folder).grid()
    u, times = load_split(folder, "train", torch.float64)
    torch.manual_seed(job.seed)
    gen = torch.Generator().manual_seed(job.seed)
    net = GeneratorNet(p.n_generators, p.width, p.head_width).double()
    cfg = TrainConfig(p.steps, p.lr, p.sigma, p.rk4_steps, p.lipschitz_weight, p.lipschitz_tau, p.threshold,
                      p.sobolev_weight, p.sobolev_fraction)
    reference = sample_patches(u, times, grid, p.patch_size, p.reference_patches, gen)
    curve: list[float] = []
    fit_generators(net, lambda g: sample_patches(u, times, grid, p.patch_size, p.batch_patches, g),
                   reference, grid, cfg, gen, on_step=lambda step, loss, scores: curve.append(loss))
    return {"seed": job.seed, "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "curve": curve}


@stage(params=LearnSymmetryParams, inputs=("prepare",))
def learn_symmetry(ctx: StageContext, p: LearnSymmetryParams) -> None:
    """Generators of KdV's symmetries from data: sum of validity scores, hard orthonormality, Lipschitz."""
    jobs = [SeedJob(seed, str(ctx.input("prepare")), p.model_dump()) for seed in p.seeds]

    def log(i, result):
        for step, loss in enumerate(result["curve"][::10]):
            ctx.log_metrics({f"loss_seed{result['seed']}": loss}, step=10 * step)

    results = ctx.map(train_seed, jobs, workers=p.workers, desc="seeds", on_result=log)
    for result in results:
        io.save_state(ctx.out_dir / generator_file(result["seed"]), result["state"])
    io.write_json(ctx.out_dir / "meta.json", {"seeds": p.seeds, "n_generators": p.n_generators,
                                              "width": p.width, "head_width": p.head_width})
    io.write_json(ctx.out_dir / "curves.json", {str(r["seed"]): r["curve"] for r in results})
