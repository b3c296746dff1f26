"""augment: LPSDA-style augmentation of a 1-D FNO for KdV rollout in a low-data regime, with no,
the known (x/t-translation, Galilean boost) or the learned generators; rollout NMSE per test trajectory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import DataMeta, generator_file, load_split, sample_patches

METHODS = ("none", "known", "learned")
KNOWN = ("x_translation", "t_translation", "galilean_boost")


class AugmentParams(Params):
    n_train: int = Field(gt=0, description="training trajectories per seed (the low-data regime)")
    time_history: int = Field(gt=0, description="input frames of the FNO")
    time_future: int = Field(gt=0, description="frames predicted per call (one rollout chunk)")
    width: int = Field(gt=0, description="FNO channels")
    modes: int = Field(gt=0, description="Fourier modes kept per layer")
    layers: int = Field(gt=0, description="Fourier layers")
    steps: int = Field(gt=0, description="AdamW steps (cosine schedule)")
    batch: int = Field(gt=0, description="windows per step")
    lr: float = Field(gt=0)
    p_original: float = Field(ge=0, le=1, description="probability of drawing the untransformed trajectory")
    n_copies: int = Field(gt=0, description="transformed copies per training trajectory")
    sigma: float = Field(gt=0, description="alpha_j ~ U(-sigma, sigma) per generator (unit-RMS fields)")
    rk4_steps: int = Field(gt=0, description="RK4 steps of the flow over s in [0, 1]")
    min_rows: int = Field(gt=0, description="a copy with fewer valid frames is rejected")
    n_learned: int = Field(gt=0, description="learned generators used: the most valid on training patches")
    rank_patches: int = Field(gt=0, description="training patches on which the learned fields are ranked")
    rank_patch_size: int = Field(ge=8, description="t x x side of those patches")
    rank_step: float = Field(gt=0, description="|s| at which the learned fields are ranked")
    threshold: float = Field(gt=0, description="th of log max(|residual|, th) in the ranking")
    workers: int = Field(gt=0, description="processes training (seed, method) jobs in parallel")


@dataclass(frozen=True)
class FnoJob:
    seed: int
    method: str
    data_dir: str
    learned_dir: str
    device: str
    params: dict


def learned_maker(job: FnoJob, p: AugmentParams, u, times, grid):
    """The ``n_learned`` learned fields with the lowest validity on training patches (mean over +-s),
    as a maker alpha -> sum_j alpha_j V_j (one network evaluation per RK4 stage)."""
    import torch

    from models.symmetry_generators.generators import GeneratorNet
    from models.symmetry_generators.validity import flowed_validity, inner

    meta = io.read_json(Path(job.learned_dir) / "meta.json")
    net = GeneratorNet(meta["n_generators"], meta["width"], meta["head_width"]).double()
    net.load_state_dict(io.load_state(Path(job.learned_dir) / generator_file(job.seed)))
    net = net.eval().to(u.device)
    patches = sample_patches(u.double().cpu(), times.double().cpu(), grid, p.rank_patch_size, p.rank_patches,
                             torch.Generator().manual_seed(job.seed)).to(u.device)
    with torch.no_grad():
        score = [float(sum(flowed_validity(net.field(i), patches, grid, s, 4, p.threshold)
                           for s in (-p.rank_step, p.rank_step))) / 2 for i in range(meta["n_generators"])]
    chosen = sorted(range(len(score)), key=score.__getitem__)[:p.n_learned]
    net = net.float()
    mix = net.mix[chosen]                                                       # (k, n_generators)
    flat = patches.reshape(-1, 3).float()
    with torch.no_grad():  # the fields are unit-RMS on the reference patches; re-check on these ones
        norms = [float(inner(net.field(i)(flat), net.field(i)(flat)).sqrt()) for i in chosen]
    make = lambda alpha: (lambda q: torch.einsum("j,...jc->...c", alpha @ mix, net.raw(q)))
    return make, {"validity": score, "chosen": chosen, "rms_on_train_patches": norms}


def train_job(job: FnoJob) -> dict:
    """One (seed, method): copies of the seed's training subset, an FNO trained on them, test NMSE."""
    import torch

    from models.symmetry_generators.augmentation import linear_combination, lps_copies, trajectory_points
    from models.symmetry_generators.fno import FNO1d, rollout_nmse, train_fno
    from models.symmetry_generators.validity import gram_schmidt, known_fields

    p = AugmentParams.model_validate(job.params)
    folder = Path(job.data_dir)
    grid = DataMeta.read(folder).grid()
    device = torch.device(job.device)
    u_all, times = load_split(folder, "train", torch.float32)
    u_test, _ = load_split(folder, "test", torch.float32)
    times = times.float().to(device)
    gen = torch.Generator().manual_seed(job.seed)
    u = u_all[torch.randperm(len(u_all), generator=gen)[:p.n_train]].to(device)  # the same for every method
    info: dict = {}
    pool, valid = u[:, None], torch.ones(len(u), 1, u.shape[1], dtype=torch.bool)
    start = time.perf_counter()
    if job.method != "none":
        if job.method == "known":
            flat = trajectory_points(u, times, grid).reshape(-1, 3)
            make = linear_combination(gram_schmidt([known_fields(grid)[k] for k in KNOWN], flat))
            count = len(KNOWN)
        else:
            make, info = learned_maker(job, p, u, times, grid)
            count = len(info["chosen"])
        copies, copy_rows, rejected = lps_copies(u, times, grid, make, torch.full((count,), p.sigma),
                                                 p.n_copies, p.rk4_steps, gen, p.min_rows)
        pool, valid = torch.cat([pool, copies], 1), torch.cat([valid, copy_rows], 1)
        info |= {"rejected": rejected, "valid_rows": float(copy_rows.float().mean())}
    copy_seconds = time.perf_counter() - start
    torch.manual_seed(job.seed)
    model = FNO1d(p.time_history, p.time_future, p.width, p.modes, p.layers).to(device)
    curve: list[float] = []
    start = time.perf_counter()
    train_fno(model, pool, valid, p.steps, p.batch, p.lr, p.p_original,
              torch.Generator().manual_seed(job.seed),
              on_step=lambda step, loss: curve.append(loss) if step % 10 == 0 else None)
    nmse = rollout_nmse(model.eval(), u_test.to(device)).cpu()
    return {"seed": job.seed, "method": job.method, "nmse": nmse.tolist(), "curve": curve,
            "copy_seconds": copy_seconds, "train_seconds": time.perf_counter() - start, **info}


@stage(params=AugmentParams, inputs=("prepare", "learn_symmetry"), gpu=True)
def augment(ctx: StageContext, p: AugmentParams) -> None:
    """FNO rollout NMSE with no / known / learned Lie point symmetry augmentation, per seed."""
    seeds = io.read_json(ctx.input("learn_symmetry") / "meta.json")["seeds"]
    jobs = [FnoJob(seed, method, str(ctx.input("prepare")), str(ctx.input("learn_symmetry")), str(ctx.device),
                   p.model_dump()) for seed in seeds for method in METHODS]

    def log(i, result):
        ctx.log_metrics({f"nmse_{result['method']}_seed{result['seed']}":
                         sum(result["nmse"]) / len(result["nmse"])})

    results = ctx.map(train_job, jobs, workers=p.workers, desc="seed x method", on_result=log)
    io.write_json(ctx.out_dir / "nmse.json", {"seeds": seeds, "methods": list(METHODS), "runs": results})
