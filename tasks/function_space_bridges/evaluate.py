"""evaluate: transported samples at every resolution (exact bridge step; the scored output is the final
state), MMD and density validity of 1-D functions, FD-proxy and domain accuracy of images with a floor
and a no-transport bound at each resolution, the SOC posterior against the exact GP posterior and on El
Nino; claims by confidence intervals over seeds; plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import (ExperimentParams, ReferenceParams, build_operator, control_net, reference_process,
                     weights_file)
from .data import area_downsample
from .decide import decide, headline
from .figures import write_figures
from .scoring import (density_validity, gaussian_log_lik, image_scores, median_bandwidth, mmd2,
                      posterior_errors)

FUNCTION_MODELS = ("first", "first_equal_steps", "final")


class Margins(Params):
    transport_fd_ratio: float = Field(gt=0, description="images: FD(transported) / FD(no transport) below")
    domain_accuracy: float = Field(gt=0, lt=1, description="images: transported classified as B above")
    transport_mmd_ratio: float = Field(gt=0, description="functions: MMD^2(transported) / MMD^2(none) below")
    iterations_gain: float = Field(description="relative gain (first - final) / first above (equal steps)")
    resolution_relative: float = Field(gt=0, description="resolution: |change| <= this x base, or ...")
    resolution_absolute_fd: float = Field(gt=0, description="... |FD-proxy change| <= this")
    resolution_absolute_accuracy: float = Field(gt=0, description="... |domain accuracy change| <= this")
    resolution_absolute_mmd: float = Field(gt=0, description="... |MMD^2 change| <= this")
    mass_error: float = Field(gt=0, description="densities: mean |integral - 1| below")
    negative_mass: float = Field(gt=0, description="densities: fraction of negative mass below")
    posterior_mean_error: float = Field(gt=0, description="RMS mean error / prior std below")
    posterior_std_error: float = Field(gt=0, description="RMS std error / prior std below")


class EvaluateParams(Params):
    workers: int = Field(gt=0, description="processes evaluating seeds in parallel")
    sampler: Literal["exact", "euler_maruyama"] = Field(description="scored sampler (exact bridge step)")
    sampling_steps: int = Field(gt=1)
    stiffness_limit: float = Field(gt=0, description="Euler-Maruyama needs max a_k dt below this")
    max_test_images: int | None = Field(gt=0, description="cap on test images per domain; null: all")
    posterior_tasks: int = Field(gt=0, description="synthetic regression tasks per seed")
    posterior_samples: int = Field(gt=1, description="controlled paths per task")
    elnino_context: int = Field(gt=0, description="observed months per year; the rest are targets")
    margins: Margins


@dataclass(frozen=True)
class SeedJob:
    seed: int
    prepare_dir: str
    bridge_dir: str
    posterior_dir: str
    params: dict
    device: str
    eval_seed: int  # the global seed + seed: another global seed draws other tasks, masks and samples


def predictor(folder: Path, experiment: str, seed: int, model: str, exp: ExperimentParams, dim: int,
              channels: int, device):
    from models.function_space_bridges.bridge import EndpointPredictor

    state = io.load_state(folder / weights_file(experiment, seed, model))
    return EndpointPredictor(build_operator(exp.operator, dim, channels, state, device))


def check_sampler(ou, p: EvaluateParams) -> float:
    stiffness = ou.max_stiffness(1.0 / p.sampling_steps)
    if p.sampler == "euler_maruyama" and stiffness >= p.stiffness_limit:
        raise ValueError(f"Euler-Maruyama with {p.sampling_steps} steps has max a_k dt = {stiffness:.3g} >= "
                         f"{p.stiffness_limit} on grid {ou.shape}: it diverges. Use sampler 'exact' or more steps.")
    return stiffness


def evaluate_functions(job: SeedJob, p: EvaluateParams, exp: ExperimentParams) -> dict:
    import torch

    from models.function_space_bridges.bridge import sample

    data = {k: torch.from_numpy(v) for k, v in io.load_arrays(Path(job.prepare_dir) / "functions.npz").items()}
    grids = sorted(int(k.split("_")[-1]) for k in data if k.startswith("gp_test_"))
    bandwidth = median_bandwidth(data[f"density_test_{grids[0]}"])
    out = {"bandwidth": bandwidth, "grids": grids, "examples": {}}
    for n in grids:
        ou = reference_process(exp.reference, (n,), job.device)
        target, source = data[f"density_test_{n}"], data[f"gp_test_{n}"]
        row = {"stiffness": check_sampler(ou, p), "no_transport": mmd2(source, target, bandwidth),
               "floor": mmd2(data[f"density_heldout_{n}"], target, bandwidth)}
        for model in FUNCTION_MODELS:
            pred = predictor(Path(job.bridge_dir), "functions", job.seed, model, exp, 1, 1, job.device)
            moved = sample(pred, ou, source.double().to(job.device), p.sampling_steps, p.sampler).cpu()
            row[model] = {"mmd2": mmd2(moved, target, bandwidth), **density_validity(moved)}
            if model == "final":
                out["examples"][str(n)] = {"source": source[:6].numpy(), "moved": moved[:6].float().numpy()}
        out[str(n)] = row
    return out


def evaluate_images(job: SeedJob, p: EvaluateParams, exp: ExperimentParams, meta: dict) -> dict:
    import torch

    from models.function_space_bridges.bridge import sample
    from tasks.data.digit_features import DigitClassifier, classifier_features

    folder = Path(job.prepare_dir)
    arrays = io.load_arrays(folder / "images.npz")
    cap = slice(0, p.max_test_images)
    low, channels = meta["image_size"], meta["channels"]
    clf = DigitClassifier(size=low, num_classes=meta["num_classes"], in_channels=channels)
    clf.load_state_dict(io.load_state(folder / "classifier.safetensors"))
    clf.to(job.device)
    ref = classifier_features(clf, torch.from_numpy(arrays["b_test"][cap]).to(job.device))[0]
    ref = ref.cpu().numpy().astype(np.float64)
    score = lambda x: image_scores(clf, torch.as_tensor(x), ref, meta["domain_b_classes"])
    out = {"examples": {}}
    for res, suffix in ((low, ""), (meta["test_image_size"], "_high")):
        ou = reference_process(exp.reference, (res, res), job.device)
        down = lambda x: area_downsample(np.asarray(x, dtype=np.float32), low)
        source = torch.from_numpy(arrays[f"a_test{suffix}"][cap])
        row = {"stiffness": check_sampler(ou, p), "no_transport": score(down(source)),
               "floor": score(down(arrays[f"b_train{suffix}"][cap]))}
        for model in ("first_equal_steps", "final") if res == low else ("final",):  # baseline: training grid
            pred = predictor(Path(job.bridge_dir), "images", job.seed, model, exp, 2, channels, job.device)
            moved = sample(pred, ou, source.double().to(job.device), p.sampling_steps, p.sampler).float().cpu()
            row[model] = score(down(moved))
            if model == "final":
                out["examples"][str(res)] = {"source": source[:8].numpy(), "moved": moved[:8].numpy()}
        out[str(res)] = row
    return out


def evaluate_posterior(job: SeedJob, p: EvaluateParams) -> dict:
    import torch

    from models.function_space_bridges.posterior import (exact_posterior, prior_variance, random_tasks,
                                                         simulate_controlled)

    meta = io.read_json(Path(job.posterior_dir) / "meta.json")["params"]
    ou = reference_process(ReferenceParams.model_validate(meta["reference"]), (meta["grid"],), job.device)
    net = control_net(meta["grid"], meta["width"], meta["depth"],
                      io.load_state(Path(job.posterior_dir) / f"seed{job.seed}/control.safetensors")).to(job.device)
    noise = meta["noise_std"]
    prior_std = (ou.from_coeffs(torch.diag(prior_variance(ou).sqrt())) ** 2).sum(0).sqrt()  # marginal std

    def soc_moments(y, mask):
        k = p.posterior_samples
        with torch.no_grad():
            f1, _ = simulate_controlled(net, ou, y.repeat_interleave(k, 0), mask.repeat_interleave(k, 0),
                                        meta["time_steps"])
        f1 = f1.reshape(len(y), k, -1).double()
        return f1.mean(1), f1.std(1)

    torch.manual_seed(10_000 + job.eval_seed)
    _, y, mask = random_tasks(ou, p.posterior_tasks, tuple(meta["context"]), noise)
    mean, std = soc_moments(y, mask)
    exact_mean, exact_var = exact_posterior(ou, y, mask, noise)
    out = {"synthetic": posterior_errors(mean, std, exact_mean, exact_var, prior_std),
           "example": {"y": y[0].numpy(), "mask": mask[0].numpy(), "mean": mean[0].numpy(), "std": std[0].numpy(),
                       "exact_mean": exact_mean[0].numpy(), "exact_std": exact_var[0].sqrt().numpy()}}
    series = torch.from_numpy(io.load_arrays(Path(job.prepare_dir) / "series.npz")["elnino"]).to(job.device)
    order = torch.argsort(torch.rand(series.shape, generator=torch.Generator().manual_seed(job.eval_seed)), dim=-1)
    mask = (order < p.elnino_context).float().to(series.device)
    mean, std = soc_moments(series, mask)
    exact_mean, exact_var = exact_posterior(ou, series, mask, noise)
    target = mask == 0
    ll = lambda m, v: float(gaussian_log_lik(series.double(), m, v + noise ** 2)[target].mean())
    out["elnino"] = {"target_log_lik_soc": ll(mean, std ** 2), "target_log_lik_exact": ll(exact_mean, exact_var),
                     "target_log_lik_prior": ll(torch.zeros_like(mean), prior_std[None] ** 2 + 0 * mean)}
    return out


def evaluate_seed(job: SeedJob) -> dict:
    import torch

    p = EvaluateParams.model_validate(job.params)
    torch.manual_seed(job.eval_seed)
    experiments = io.read_json(Path(job.bridge_dir) / "meta.json")["experiments"]
    exp = {k: ExperimentParams.model_validate(v) for k, v in experiments.items()}
    meta = io.read_json(Path(job.prepare_dir) / "meta.json")
    return {"seed": job.seed, "functions": evaluate_functions(job, p, exp["functions"]),
            "images": evaluate_images(job, p, exp["images"], meta), "posterior": evaluate_posterior(job, p)}


@stage(params=EvaluateParams, inputs=("prepare", "bridge", "posterior"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Scores at every resolution, claims by CIs over seeds, plots."""
    seeds = io.read_json(ctx.input("bridge") / "meta.json")["seeds"]
    jobs = [SeedJob(s, str(ctx.input("prepare")), str(ctx.input("bridge")), str(ctx.input("posterior")),
                    p.model_dump(), str(ctx.device), ctx.seed + s) for s in seeds]
    rows = ctx.map(evaluate_seed, jobs, workers=p.workers, desc="seeds")
    claims, gates = decide(rows, p.margins)
    examples = [{k: r[k].pop("examples", None) if k != "posterior" else r[k].pop("example") for k in
                 ("functions", "images", "posterior")} for r in rows]
    ctx.write_metrics(claims, gates, headline=headline(rows), evidence={"seeds": rows,
                      "training": io.read_json(ctx.input("bridge") / "meta.json")})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})
    write_figures(ctx, rows, examples[0])
