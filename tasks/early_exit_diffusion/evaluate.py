"""evaluate: images/s, block evaluations per image, FD-proxy and label accuracy per sampler and variant;
the paper's claims decided by confidence intervals over seeds.

Reads as load -> summarise -> gates and claims -> write -> figures. Every variant of a seed is sampled
in one process, in lockstep (``models.early_exit_diffusion.sampling_grid``), so the per-seed speed
ratios are measured on the same machine state; the seeds run in ``workers`` processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import Claim, Gate, all_of, gate, per_seed
from tasks.early_exit_diffusion.common import FinetunedMeta, PretrainedMeta, base_dir, load_dit, variant_schedule
from tasks.early_exit_diffusion.data import PreparedMeta, load_prepared

Sampler = Literal["ddpm", "ddim", "dpm_solver"]


class EvaluateParams(Params):
    samplers: dict[Sampler, int] = Field(min_length=1, description="sampler -> number of inference steps")
    num_images: int = Field(gt=0, description="images per (variant, sampler, seed); labels cycle over classes")
    batch_size: int = Field(gt=0, description="sampling batch size (the same for every variant)")
    guidance_scale: float = Field(ge=1.0, description="classifier-free guidance (1: off)")
    timing_passes: int = Field(ge=1, description="ase_faster: the full model and ASE are sampled this many times "
                                                 "in lockstep (the first pass gives the images); each solver "
                                                 "step's time is the minimum over the passes")
    speedup_threshold: float = Field(gt=0, description="margin of ase_faster: per-seed ASE / full images/s > this")
    quality_tolerance: float = Field(gt=0, description="margin of ase_quality_kept (and of its equal-steps "
                                                       "variant): per-seed ASE / full FD-proxy < this")
    finetuning_fd_ratio: float = Field(gt=0, description="margin of finetuning_needed: per-seed naive / ASE "
                                                         "FD-proxy > this")
    direction_fd_ratio: float = Field(gt=0, description="margin of schedule_direction_matters: per-seed "
                                                        "reversed / ASE FD-proxy > this")
    fewer_steps_fd_ratio: float = Field(gt=0, description="margin of ase_beats_fewer_steps: per-seed ASE / "
                                                          "equal-compute fewer-steps full model FD-proxy < this")
    base_label_accuracy_min: float = Field(ge=0, le=1, description="gate base_quality: every base's (full "
                                                                   "model's) samples carry their label at "
                                                                   "least this often")
    base_fd_ratio_max: float = Field(gt=0, description="gate base_quality: every base's FD-proxy is at most this "
                                                       "x the real-vs-real floor")
    grid_sampler: Sampler = Field(description="sampler for the sample grid plot")
    workers: int = Field(gt=0, description="processes sampling seeds in parallel, one torch thread each; "
                                           "speed ratios stay within one process (lockstep)")

    @model_validator(mode="after")
    def _grid(self):
        if self.grid_sampler not in self.samplers:
            raise ValueError(f"grid_sampler '{self.grid_sampler}' is not one of samplers {list(self.samplers)}")
        return self


@stage(params=EvaluateParams, inputs=("prepare", "pretrain", "finetune"), gpu=True)
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Images/s, block evaluations per image, FD-proxy and label accuracy per sampler and variant."""
    meta = PreparedMeta.model_validate(io.read_json(ctx.input("prepare") / "meta.json"))
    base_meta = PretrainedMeta.model_validate(io.read_json(ctx.input("pretrain") / "meta.json"))
    ft_meta = FinetunedMeta.model_validate(io.read_json(ctx.input("finetune") / "meta.json"))
    results = _sample_every_seed(ctx, p, ft_meta.seeds)
    rows = [r for res in results for r in res["rows"]]

    samplers = list(p.samplers)
    summary = summarise(rows, samplers)
    floor_n = floor_at_n(ctx.input("prepare"), meta, p.num_images, ctx.seed)
    base_gate, base_quality = base_quality_gate(rows, floor_n, p.base_label_accuracy_min, p.base_fd_ratio_max)
    gates = [base_gate]
    claims = compute_claims(rows, samplers, speedup=p.speedup_threshold, quality=p.quality_tolerance,
                            finetuning=p.finetuning_fd_ratio, direction=p.direction_fd_ratio,
                            fewer_steps=p.fewer_steps_fd_ratio, gates=gates)
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})

    compute_fraction = sum(ft_meta.schedule) / (len(ft_meta.schedule) * base_meta.num_layers)
    ctx.write_metrics(claims, gates, headline=headline_numbers(summary, meta, compute_fraction, floor_n), evidence={
        "schedule": ft_meta.schedule, "compute_fraction": compute_fraction, "num_layers": base_meta.num_layers,
        "seeds": ft_meta.seeds, "samplers": dict(p.samplers), "num_images": p.num_images,
        "batch_size": p.batch_size, "fd_proxy_floor": meta.fd_proxy_floor, "fd_proxy_floor_at_n": floor_n,
        "classifier_test_accuracy": meta.classifier_test_accuracy, "base_quality": base_quality, "summary": summary,
        "speed_ratios_per_seed": {s: {v: per_seed_ratios(rows, s, v, "full", "images_per_s") for v in summary[s]}
                                  for s in samplers},
        "runs": rows,
        "note": "speed ratios are per seed (lockstep, same batch size, one process); the full model and ASE "
                f"are timed over {p.timing_passes} lockstep passes (per solver step the minimum), every other "
                "variant over one, so their speed-ups against the full model read slightly low; FD-proxy is the mean "
                "over seeds (std ddof=1); at CPU scale each seed has its own base (pretrained with the global "
                "seed + the seed), fine-tuning and sampling noise, so the intervals cover base training; "
                "at paper scale the seeds share the loaded DiT; 'naive' is the seed's base with the ASE "
                "schedule and no fine-tuning; "
                "'full_control' is the full model fine-tuned for the same steps without exits; "
                f"'{FEWER}' is the full model with fewer solver steps, as many as give ASE's block "
                "evaluations per image (nearest), from the same noise, timed on its own."})
    io.write_json(ctx.results_file("tradeoff.json"), [
        {"sampler": s, "variant": v, "fd_proxy": summary[s][v]["fd_proxy"],
         "images_per_s": summary[s][v]["images_per_s"]} for s in summary for v in summary[s]])

    for variant, (sampler, imgs) in results[0]["grid_images"].items():
        _grid_figure(ctx, variant, sampler, imgs)
    _tradeoff_figure(ctx, summary)


# ------------------------------------------------------------------------------------------ sampling
def _sample_every_seed(ctx: StageContext, p: EvaluateParams, seeds: list[int]) -> list[dict]:
    jobs = [dict(seed=seed, prepare=str(ctx.input("prepare")), pretrain=str(ctx.input("pretrain")),
                 finetune=str(ctx.input("finetune")), device=str(ctx.device), params=p.model_dump(mode="json"),
                 grid=(seed == seeds[0])) for seed in seeds]

    def log(i: int, res: dict) -> None:
        ctx.log_metrics({f"{r['sampler']}_{r['variant']}_fd_proxy": r["fd_proxy"] for r in res["rows"]},
                        step=int(res["seed"]))

    return ctx.map(evaluate_seed, jobs, workers=p.workers, desc="sampling (seeds)", on_result=log)


def _load_classifier(folder: Path, meta: PreparedMeta):
    from tasks.data.digit_features import DigitClassifier

    clf = DigitClassifier(size=meta.shape[-1], num_classes=meta.num_classes, in_channels=meta.shape[0])
    clf.load_state_dict(io.load_state(folder / "classifier.safetensors"))
    return clf.eval()


FLOOR_DRAWS = 10  # random train subsets averaged in the matched real-vs-real floor


def floor_at_n(folder: Path, meta: PreparedMeta, n: int, seed: int) -> float:
    """The real-vs-real FD-proxy floor at the generated sets' size: ``n`` random real training images
    against the held-out images (mean of ``FLOOR_DRAWS`` draws). A Fréchet distance from ``n`` samples is
    biased upwards as ``n`` shrinks, so the floor of the whole split (``meta.fd_proxy_floor``) would not be
    comparable with a generated set of ``n`` images: at 200 images, real digits measure about 3-4x it."""
    import numpy as np

    from tasks.data.digit_features import classifier_features
    from tasks.metrics import frechet_distance

    data, _ = load_prepared(folder)
    clf = _load_classifier(folder, meta)
    f_train = classifier_features(clf, data["x_train"].float())[0].numpy()
    f_test = classifier_features(clf, data["x_test"].float())[0].numpy()
    rng = np.random.default_rng(seed)
    replace = n > len(f_train)
    return float(np.mean([frechet_distance(f_train[rng.choice(len(f_train), n, replace=replace)], f_test)
                          for _ in range(FLOOR_DRAWS)]))


def evaluate_seed(job: dict) -> dict:
    """Sample every variant with every sampler for one seed (lockstep, with warm-up, in one process) and
    score it; top-level so that worker processes can run it."""
    import torch

    from models.early_exit_diffusion import EarlyExitDenoiser, sampling_grid
    from tasks.data.digit_features import classifier_features
    from tasks.metrics import frechet_distance

    p = EvaluateParams(**job["params"])
    seed, device = job["seed"], torch.device(job["device"])
    data, meta = load_prepared(Path(job["prepare"]))
    clf = _load_classifier(Path(job["prepare"]), meta)
    ft_meta = FinetunedMeta.model_validate(io.read_json(Path(job["finetune"]) / "meta.json"))
    blocks = ft_meta.schedule
    base = load_dit(base_dir(Path(job["pretrain"]), seed)).to(device).eval()
    null_label = base.transformer_blocks[0].norm1.emb.class_embedder.num_classes
    f_real = classifier_features(clf, data["x_test"].float())[0].numpy()
    labels = torch.arange(p.num_images) % meta.num_classes
    dens = {"full": EarlyExitDenoiser(base, variant_schedule("full", base, blocks)),
            "naive": EarlyExitDenoiser(base, variant_schedule("naive", base, blocks))}
    for v in ft_meta.variants:
        m = load_dit(Path(job["finetune"]) / f"{v}_seed{seed}").to(device).eval()
        dens[v] = EarlyExitDenoiser(m, variant_schedule(v, m, blocks))
    grid = sampling_grid(dens, dict(p.samplers), labels, tuple(meta.shape), [seed], p.batch_size,
                         p.guidance_scale, null_label, device, warmup=True, timing_passes=p.timing_passes,
                         timed=["full", "ase"])
    steps = {(sampler, v): n for sampler, n in p.samplers.items() for v in dens}
    for sampler in p.samplers:  # the practitioner's first baseline: the full model at ASE's compute
        per_step = grid[(seed, sampler, "full")]["blocks_per_image"] / p.samplers[sampler]  # x2 with guidance
        n = equal_compute_steps(grid[(seed, sampler, "ase")]["blocks_per_image"], per_step)
        dens[FEWER], steps[(sampler, FEWER)] = EarlyExitDenoiser(base, variant_schedule("full", base, blocks)), n
        grid.update(sampling_grid({FEWER: dens[FEWER]}, {sampler: n}, labels, tuple(meta.shape), [seed],
                                  p.batch_size, p.guidance_scale, null_label, device, warmup=False))
    rows, grid_images = [], {}
    for (s, sampler, variant), r in grid.items():
        imgs = r["images"].float()
        if meta.pixel_range:
            imgs = imgs.clamp(*meta.pixel_range)
        feats, pred = classifier_features(clf, imgs)
        rows.append({"seed": s, "sampler": sampler, "variant": variant,
                     "fd_proxy": frechet_distance(feats.numpy(), f_real),
                     "label_accuracy": float((pred == labels).float().mean()),
                     "images_per_s": r["images_per_s"], "timing_passes": r["timing_passes"],
                     "blocks_per_image": r["blocks_per_image"],
                     "steps": steps[(sampler, variant)], "schedule": list(dens[variant].schedule.blocks)})
        if job["grid"] and sampler == p.grid_sampler:
            grid_images[variant] = (sampler, imgs[: 10 * min(8, max(1, p.num_images // 10))].cpu())
    return {"seed": seed, "rows": rows, "grid_images": grid_images}


# ----------------------------------------------------------------------------------------- summary
FEWER = "full_fewer_steps"  # the full model with fewer solver steps, at ASE's block evaluations per image


def equal_compute_steps(ase_blocks_per_image: float, full_blocks_per_step: float) -> int:
    """Solver steps of the full model that come nearest to ASE's block evaluations per image (ties up);
    ``full_blocks_per_step`` is the depth, twice it with classifier-free guidance."""
    return max(1, int(ase_blocks_per_image / full_blocks_per_step + 0.5))


def per_seed_ratios(rows: list[dict], sampler: str, variant: str, reference: str, key: str) -> list[float]:
    """``key`` of ``variant`` over ``key`` of ``reference`` for each seed (paired: same seed, sampler)."""
    by = {(r["seed"], r["variant"]): r[key] for r in rows if r["sampler"] == sampler}
    seeds = sorted(s for s, v in by if v == variant)
    return [by[(s, variant)] / by[(s, reference)] for s in seeds]


def summarise(rows: list[dict], samplers: list[str]) -> dict:
    """Per sampler and variant: means over seeds (and the FD-proxy's std), and the mean per-seed speed
    ratio to the full model."""
    from tasks.metrics import mean_std

    out: dict = {}
    for s in samplers:
        out[s] = {}
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["sampler"] == s))
        full_fd = mean_std([r["fd_proxy"] for r in rows if r["sampler"] == s and r["variant"] == "full"])
        for v in variants:
            rs = [r for r in rows if r["sampler"] == s and r["variant"] == v]
            fd = mean_std([r["fd_proxy"] for r in rs])
            out[s][v] = {
                "fd_proxy": fd["mean"], "fd_proxy_std": fd["std"],
                "label_accuracy": mean_std([r["label_accuracy"] for r in rs])["mean"],
                "images_per_s": mean_std([r["images_per_s"] for r in rs])["mean"],
                "speedup_vs_full": mean_std(per_seed_ratios(rows, s, v, "full", "images_per_s"))["mean"],
                "blocks_per_image": mean_std([r["blocks_per_image"] for r in rs])["mean"],
                "fd_ratio_vs_full": fd["mean"] / full_fd["mean"],
            }
    return out


def headline_numbers(summary: dict, meta: PreparedMeta, compute_fraction: float, floor_n: float) -> dict:
    """The paper's table per sampler: ASE's speed-up and every variant's FD-proxy (FID at paper scale),
    with the full model's label accuracy; the FD-proxy floors (whole split, and at the generated sets'
    size) and the schedule's compute fraction."""
    out: dict = {}
    for s, variants in summary.items():
        out[s] = {"ase_speedup": variants["ase"]["speedup_vs_full"],
                  **{f"fd_proxy_{v}": r["fd_proxy"] for v, r in variants.items()},
                  "label_accuracy_full": variants["full"]["label_accuracy"]}
    out["fd_proxy_floor"] = meta.fd_proxy_floor
    out["fd_proxy_floor_at_n"] = floor_n
    out["compute_fraction"] = compute_fraction
    return out


# -------------------------------------------------------------------------------- gates and claims
def base_quality_gate(rows: list[dict], floor: float, min_accuracy: float, max_fd_ratio: float) -> tuple[Gate, dict]:
    """The full (pretrained) models must draw the data before a quality comparison means anything: every
    base's (seed's) samples, with every sampler, carry their label at least ``min_accuracy`` of the time and
    have an FD-proxy at most ``max_fd_ratio`` x the real-vs-real floor at the same number of images
    (``floor_at_n``). One gate, ``base_quality``: its value is the worst of the two headrooms (>= 1: both
    hold for every base); the worst raw values come back for the evidence."""
    full = [r for r in rows if r["variant"] == "full"]
    accuracy = min(r["label_accuracy"] for r in full)
    fd_ratio = max(r["fd_proxy"] for r in full) / floor
    value = min(accuracy / min_accuracy, max_fd_ratio / fd_ratio)
    g = gate("base_quality", value, 1.0, ">=",
             f"min over bases (seeds) and samplers of (label accuracy of the full model's samples / "
             f"{min_accuracy}, {max_fd_ratio} / (its FD-proxy / the real-vs-real floor at the same number of "
             f"images)): >= 1 means every base draws the data")
    return g, {"worst_label_accuracy": accuracy, "worst_fd_ratio": fd_ratio,
               "per_seed": {str(r["seed"]) + "/" + r["sampler"]: {"label_accuracy": r["label_accuracy"],
                                                                 "fd_ratio": r["fd_proxy"] / floor} for r in full}}


def compute_claims(rows: list[dict], samplers: list[str], *, speedup: float, quality: float, finetuning: float,
                   direction: float, fewer_steps: float, gates: list[Gate] = ()) -> list[Claim]:
    """The paper's claims, each required for every sampler: per-seed paired ratios, t-interval over
    seeds, verdict when the CI lies beyond the margin. The quality claims are guarded by ``gates``."""
    variants = {r["variant"] for r in rows}

    def every_sampler(name, variant, reference, key, margin, sign, statement, guarded=True) -> Claim:
        parts = {s: per_seed(f"{name}[{s}]", per_seed_ratios(rows, s, variant, reference, key), margin=margin,
                             direction=sign, statement=statement, gates=gates if guarded else ())
                 for s in samplers}
        return all_of(name, parts, statement)

    claims = [
        every_sampler("ase_faster", "ase", "full", "images_per_s", speedup, ">",
                      "ASE images/s / full model images/s", guarded=False),
        every_sampler("ase_quality_kept", "ase", "full", "fd_proxy", quality, "<",
                      "ASE FD-proxy / full model FD-proxy"),
        every_sampler("finetuning_needed", "naive", "ase", "fd_proxy", finetuning, ">",
                      "naive (no fine-tuning) FD-proxy / ASE FD-proxy"),
    ]
    if "reversed" in variants:
        claims.append(every_sampler("schedule_direction_matters", "reversed", "ase", "fd_proxy", direction, ">",
                                    "reversed-schedule FD-proxy / ASE FD-proxy"))
    if "full_control" in variants:  # stricter: the full model given the same extra training steps
        claims.append(every_sampler("ase_quality_kept_vs_equal_steps_full", "ase", "full_control", "fd_proxy",
                                    quality, "<", "ASE FD-proxy / full_control FD-proxy"))
    if FEWER in variants:  # equal compute: the full model with fewer solver steps
        claims.append(every_sampler("ase_beats_fewer_steps", "ase", FEWER, "fd_proxy", fewer_steps, "<",
                                    "ASE FD-proxy / FD-proxy of the full model with fewer solver steps at "
                                    "ASE's block evaluations per image"))
    return claims


# ----------------------------------------------------------------------------------------- figures
def _grid_figure(ctx: StageContext, variant: str, sampler: str, imgs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if imgs.shape[1] != 1:  # latents: show the first channel
        imgs = imgs[:, :1]
    n = imgs.shape[0]
    rows = max(1, n // 10)
    fig, axes = plt.subplots(rows, 10, figsize=(10, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    fig.suptitle(f"{variant} ({sampler}): one column per class")
    ctx.log_figure(fig, f"samples_{variant}.png")


def _tradeoff_figure(ctx: StageContext, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(summary)
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.2 * len(samplers), 3.6), squeeze=False)
    for ax, s in zip(axes[0], samplers):
        for v, r in summary[s].items():
            ax.scatter(r["images_per_s"], r["fd_proxy"], s=40)
            ax.annotate(v, (r["images_per_s"], r["fd_proxy"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_title(s)
        ax.set_xlabel("images / s")
        ax.set_ylabel("FD-proxy (lower is better)")
        ax.set_yscale("log")
    fig.tight_layout()
    ctx.log_figure(fig, "tradeoff.png")
