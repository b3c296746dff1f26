"""The digits part of evaluate: the gate, the claim ``image_generators_found``, headline and plot.

Per seed: ``found`` = the largest |correlation| of a learned field with rotation or with isotropic
scaling (uniform inner product on the pixel grid; translations are orthogonal to both); ``gain`` =
test accuracy of the classifier trained on few images with learned-generator augmentation minus
without augmentation. The gate ``image_score_separates`` asks that the feature-based score rates
rotation and scaling as more valid than random smooth fields (otherwise finding them says nothing).
"""
from __future__ import annotations

import numpy as np

from tasks.core.claims import all_of, gate, per_seed

METHODS = ("none", "affine", "learned")


def found(run: dict) -> float:
    return max(max(c.values()) for c in run["correlation"].values())


def random_gap(run: dict) -> float:
    """mean validity of the random fields minus the worse of rotation and scaling (> 0: separated)."""
    v = run["validity"]
    return float(np.mean([x for k, x in v.items() if k.startswith("random")]) - max(v["rotation"], v["scaling"]))


def decide_images(runs: list[dict], correlation_margin: float, accuracy_margin: float):
    separates = gate("image_score_separates", float(np.mean([random_gap(r) for r in runs])), 0.0, ">=",
                     "mean over seeds of the random fields' validity minus the worse of rotation and scaling")
    claim = all_of("image_generators_found", {
        "rotation_or_scaling": per_seed(
            "rotation_or_scaling", [found(r) for r in runs], margin=correlation_margin, gates=[separates],
            statement="largest |correlation| of a learned field with rotation or scaling"),
        "learned_beats_none": per_seed(
            "learned_beats_none", [r["accuracy"]["learned"] - r["accuracy"]["none"] for r in runs],
            margin=accuracy_margin, gates=[separates],
            statement="test accuracy with learned-generator augmentation minus without augmentation")},
        statement="on digits, a learned generator correlates with rotation or scaling and augmenting with the "
                  "learned generators beats no augmentation")
    return claim, separates


def headline(runs: list[dict]) -> dict:
    mean = lambda f: float(np.mean([f(r) for r in runs]))
    v = lambda name: mean(lambda r: r["validity"][name])
    return {"accuracy": {m: mean(lambda r: r["accuracy"][m]) for m in METHODS},
            "validity": {"rotation": v("rotation"), "scaling": v("scaling"),
                         "random_mean": mean(lambda r: np.mean([x for k, x in r["validity"].items()
                                                                if k.startswith("random")])),
                         "learned_mean": mean(lambda r: np.mean([x for k, x in r["validity"].items()
                                                                 if k.startswith("learned")]))},
            "max_rotation_or_scaling_corr": mean(found)}


def evidence(runs: list[dict]) -> dict:
    return {"runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
            "affine_minus_none": [r["accuracy"]["affine"] - r["accuracy"]["none"] for r in runs],
            "learned_minus_affine": [r["accuracy"]["learned"] - r["accuracy"]["affine"] for r in runs]}


def write_figure(ctx, runs: list[dict], folder, net_shape: dict, size: int) -> None:
    """Validity of every field and the learned fields as arrows (first seed); accuracy by augmentation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from models.symmetry_generators.images import PlaneGeneratorNet, pixel_grid
    from tasks.core import io

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
    v = runs[0]["validity"]
    names = list(v)
    ax0.barh(range(len(names)), [v[n] for n in names],
             color=["C0" if n.startswith("learned") else "0.7" if n.startswith("random") else "C1" for n in names])
    ax0.set_yticks(range(len(names)), names, fontsize=6)
    ax0.set(xlabel="validity (mean feature angle, rad)", title=f"digits, seed {runs[0]['seed']}")
    for r in runs:
        ax1.plot(range(len(METHODS)), [r["accuracy"][m] for m in METHODS], color="0.6", marker="o", lw=0.8)
    ax1.plot(range(len(METHODS)), [np.mean([r["accuracy"][m] for r in runs]) for m in METHODS], color="k",
             marker="s", lw=2, label="mean over seeds")
    ax1.set_xticks(range(len(METHODS)), [f"{m}\naugmentation" for m in METHODS])
    ax1.set(ylabel="test accuracy", title="classifier on few digits")
    ax1.legend(fontsize=7)
    ctx.log_figure(fig, "digits_validity_accuracy.png")

    net = PlaneGeneratorNet(**net_shape)
    net.load_state_dict(io.load_state(folder / f"seed{runs[0]['seed']}/plane_generators.safetensors"))
    grid = pixel_grid(size)[::2, ::2]
    n = net_shape["n_generators"]
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    with torch.no_grad():
        for i in range(n):
            f = net.field(i)(grid)
            corr = runs[0]["correlation"][f"learned{i}"]
            axes[0, i].quiver(grid[..., 0], -grid[..., 1], f[..., 0], -f[..., 1])
            axes[0, i].set_title(f"learned{i}: rot {corr['rotation']:.2f}, scale {corr['scaling']:.2f}", fontsize=6)
            axes[0, i].set_xticks([]), axes[0, i].set_yticks([])
    fig.suptitle("learned generators on the digit plane (|corr| with rotation / scaling)", fontsize=8)
    ctx.log_figure(fig, "digits_generator_fields.png")
