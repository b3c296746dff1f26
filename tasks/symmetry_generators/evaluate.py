"""evaluate: the validity gate (data floor, known symmetries, random fields), recovery of the known
generators by the learned ones, the FNO augmentation comparison, claims by confidence intervals over
seeds, plots."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import all_of, gate, per_seed

from . import augmentation_report, image_report
from .common import DataMeta, generator_file, load_split, sample_patches

KNOWN = ("x_translation", "t_translation", "galilean_boost")


class EvaluateParams(Params):
    patch_size: int = Field(ge=8, description="t x x side of the test patches")
    test_patches: int = Field(gt=0, description="test patches per seed")
    steps: list[float] = Field(min_length=1, description="flow steps s of the validity-vs-s table")
    claim_step: float = Field(gt=0, description="|s| at which validity is compared (mean of +-s)")
    rk4_steps: int = Field(gt=0)
    threshold: float = Field(gt=0, description="th of log max(|residual|, th)")
    n_random: int = Field(gt=0, description="random smooth fields (random generator nets) per seed")
    floor_margin: float = Field(gt=0, description="a symmetry's validity lies within this of the floor")
    random_margin: float = Field(gt=0, description="random fields lie at least this above the floor")
    correlation_margin: float = Field(gt=0, lt=1, description="recovery: correlation above this")
    distinct_margin: float = Field(gt=0, lt=1, description="every pair of learned fields below this |corr|")
    augmentation_margin: float = Field(ge=0, description="learned augmentation: log(NMSE_none / NMSE_learned) "
                                                         "above this")
    augmentation_equivalence_margin: float = Field(gt=0, description="log(NMSE_learned / NMSE_known) below this")
    augmentation_gate: float = Field(description="the regime gate: CI low of log(NMSE_none / NMSE_known) "
                                                 "at least this")
    image_accuracy_margin: float = Field(ge=0, description="digits: accuracy gain of learned augmentation over none")


def seed_fields(meta: dict, seed: int, folder, points, grid, n_random: int) -> dict:
    """Known, random and learned fields of one seed, each normalised to unit RMS on ``points``."""
    import torch

    from models.symmetry_generators.generators import GeneratorNet
    from models.symmetry_generators.validity import known_fields, normalised

    flat = points.reshape(-1, 3)
    fields = {name: normalised(f, flat) for name, f in known_fields(grid).items()}
    for k in range(n_random):
        torch.manual_seed(10_000 + 100 * seed + k)
        net = GeneratorNet(1, meta["width"], meta["head_width"]).double()
        fields[f"random{k}"] = normalised(net.field(0), flat)
    net = GeneratorNet(meta["n_generators"], meta["width"], meta["head_width"]).double()
    net.load_state_dict(io.load_state(folder / generator_file(seed)))
    net.eval()
    for i in range(meta["n_generators"]):
        fields[f"learned{i}"] = normalised(net.field(i), flat)
    return fields


def evaluate_seed(meta: dict, seed: int, folder, data, grid, p: EvaluateParams) -> dict:
    """Validity of every field at every s, gaps to the floor, correlations with the known generators."""
    import torch

    from models.symmetry_generators.generators import correlation_matrix, span_correlation
    from models.symmetry_generators.validity import flowed_validity, gram_schmidt, known_fields, validity

    u, times = data
    points = sample_patches(u, times, grid, p.patch_size, p.test_patches,
                            torch.Generator().manual_seed(seed))
    floor = float(validity(points, grid, p.threshold))
    fields = seed_fields(meta, seed, folder, points, grid, p.n_random)
    with torch.no_grad():
        table = {name: {str(s): float(flowed_validity(f, points, grid, s, p.rk4_steps, p.threshold))
                        for s in p.steps} for name, f in fields.items()}
        gap = {name: float(np.mean([float(flowed_validity(f, points, grid, s, p.rk4_steps, p.threshold))
                                    for s in (-p.claim_step, p.claim_step)])) - floor
               for name, f in fields.items()}
    learned = [n for n in fields if n.startswith("learned")]
    valid = [fields[n] for n in learned if gap[n] < p.floor_margin]
    flat = points.reshape(-1, 3)
    known = dict(zip(KNOWN, gram_schmidt([known_fields(grid)[k] for k in KNOWN], flat)))
    corr = correlation_matrix([fields[n] for n in learned], points).numpy()
    randoms = [fields[f"random{k}"] for k in range(min(p.n_random, len(learned)))]
    return {"seed": seed, "floor": floor, "table": table, "gap": gap, "n_valid_learned": len(valid),
            "recovery": {k: span_correlation(f, valid, points) for k, f in known.items()},
            "random_span": {k: span_correlation(f, randoms, points) for k, f in known.items()},
            "learned_known_corr": {k: [float((fields[n](flat) * f(flat)).sum(-1).mean()) for n in learned]
                                   for k, f in known.items()},
            "max_pair_corr": float(np.abs(corr - np.eye(len(corr))).max()) if len(corr) > 1 else 0.0}


def decide(rows: list[dict], p: EvaluateParams):
    known_gap = [max(r["gap"][k] for k in KNOWN) for r in rows]
    random_gap = [np.mean([v for k, v in r["gap"].items() if k.startswith("random")]) for r in rows]
    gates = [gate("known_symmetries_near_floor", np.mean(known_gap), p.floor_margin, "<=",
                  "mean over seeds of the largest known-symmetry validity gap to the data floor"),
             gate("random_fields_above_floor", np.mean(random_gap), p.random_margin, ">=",
                  "mean over seeds of the random fields' validity gap to the data floor")]
    rec = lambda k: [r["recovery"][k] for r in rows]
    claims = [
        all_of("validity_separates", {
            "known_near_floor": per_seed("known_near_floor", known_gap, margin=p.floor_margin, direction="<",
                                         statement="largest gap of x/t-translation and boost to the floor"),
            "random_above_floor": per_seed("random_above_floor", random_gap, margin=p.random_margin,
                                           statement="mean gap of random smooth fields to the floor")},
            statement=f"known symmetries within {p.floor_margin} of the data floor at |s| = {p.claim_step}, "
                      f"random smooth fields at least {p.random_margin} above it"),
        all_of("recovers_translations", {
            k: per_seed(k, rec(k), margin=p.correlation_margin, gates=gates,
                        statement=f"correlation of {k} with the span of the learned fields at the floor")
            for k in KNOWN[:2]}, statement="learned generators at the floor span x- and t-translation"),
        per_seed("recovers_boost", rec("galilean_boost"), margin=p.correlation_margin, gates=gates,
                 statement="the Galilean boost (orthogonalised against the translations) lies in the span "
                           "of the learned generators at the floor"),
        per_seed("generators_distinct", [r["max_pair_corr"] for r in rows], margin=p.distinct_margin,
                 direction="<", statement="largest |correlation| between two learned fields on test data"),
    ]
    return claims, gates


@stage(params=EvaluateParams, inputs=("prepare", "learn_symmetry", "augment", "image_symmetry"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Validity gate and table, recovery of the known generators, augmentation, claims, plots."""
    import torch

    data_dir, learned_dir = ctx.input("prepare"), ctx.input("learn_symmetry")
    grid = DataMeta.read(data_dir).grid()
    data = load_split(data_dir, "test", torch.float64)
    meta = io.read_json(learned_dir / "meta.json")
    rows = [evaluate_seed(meta, seed, learned_dir, data, grid, p)
            for seed in ctx.progress(meta["seeds"], desc="seeds")]
    claims, gates = decide(rows, p)
    runs = io.read_json(ctx.input("augment") / "nmse.json")["runs"]
    aug_claim, aug_gate = augmentation_report.decide_augmentation(
        runs, p.augmentation_margin, p.augmentation_equivalence_margin, p.augmentation_gate)
    images = io.read_json(ctx.input("image_symmetry") / "results.json")
    image_claim, image_gate = image_report.decide_images(images["runs"], p.correlation_margin,
                                                         p.image_accuracy_margin)
    claims, gates = claims + [aug_claim, image_claim], gates + [aug_gate, image_gate]
    ctx.write_metrics(claims, gates, headline=headline(rows) | {"rollout_nmse": augmentation_report.headline(runs),
                                                                "digits": image_report.headline(images["runs"])},
                      evidence={"seeds": rows, "augmentation": augmentation_report.evidence(runs),
                                "digits": image_report.evidence(images["runs"])})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})
    write_figures(ctx, rows, grid, meta, learned_dir, data, p)
    augmentation_report.write_figure(ctx, runs)
    image_report.write_figure(ctx, images["runs"], ctx.input("image_symmetry"), images["net"], images["size"])


def headline(rows: list[dict]) -> dict:
    mean = lambda f: float(np.mean([f(r) for r in rows]))
    names = [n for n in rows[0]["gap"] if not n.startswith("random")]
    return {"validity_floor": mean(lambda r: r["floor"]),
            "gap_to_floor": {n: mean(lambda r: r["gap"][n]) for n in names}
            | {"random_mean": mean(lambda r: np.mean([v for k, v in r["gap"].items() if k.startswith("random")]))},
            "recovery_correlation": {k: mean(lambda r: r["recovery"][k]) for k in KNOWN},
            "max_pair_corr": mean(lambda r: r["max_pair_corr"])}


def write_figures(ctx: StageContext, rows: list[dict], grid, meta: dict, learned_dir, data,
                  p: EvaluateParams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    row = rows[0]
    curves = [{"field": name, "s": float(s), "validity": v} for name, tab in row["table"].items()
              for s, v in tab.items()]
    io.write_json(ctx.results_file("curves/validity_vs_step.json"), curves)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, tab in row["table"].items():
        style = dict(color="0.7", lw=0.8) if name.startswith("random") else dict(marker="o", lw=1.5)
        ax.plot([float(s) for s in tab], list(tab.values()), label=None if name.startswith("random") else name,
                **style)
    ax.axhline(row["floor"], color="k", ls="--", label="data floor")
    ax.set(xlabel="flow step s", ylabel="validity (mean log |KdV residual|)",
           title=f"validity vs s (seed {row['seed']}; grey: random fields)")
    ax.legend(fontsize=6)
    ctx.log_figure(fig, "validity_vs_step.png")

    from models.symmetry_generators.validity import gram_schmidt, known_fields

    u, times = data
    points = sample_patches(u, times, grid, p.patch_size, 1, torch.Generator().manual_seed(row["seed"]))
    flat = points.reshape(-1, 3)
    fields = dict(zip(KNOWN, gram_schmidt([known_fields(grid)[k] for k in KNOWN], flat)))
    fields |= {k: v for k, v in seed_fields(meta, row["seed"], learned_dir, points, grid, 0).items()
               if k.startswith("learned")}
    fig, axes = plt.subplots(len(fields), 3, figsize=(6, 1.5 * len(fields)), squeeze=False)
    with torch.no_grad():
        for r, (name, f) in enumerate(fields.items()):
            values = f(flat).reshape(points.shape).numpy()
            for c, comp in enumerate("xtu"):
                axes[r, c].imshow(values[0, :, :, c], aspect="auto", cmap="coolwarm", vmin=-2, vmax=2)
                axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
                axes[0, c].set_title(f"{comp} component", fontsize=8)
            axes[r, 0].set_ylabel(name, fontsize=6)
    fig.suptitle("known (orthonormalised) vs learned generators on a test patch (t down, x across)",
                 fontsize=8)
    ctx.log_figure(fig, "generator_fields.png")
