"""The evaluate stage's figures: theta(x) per class and layer, accuracy / ECE per model and data set, kept hue
shifts per class."""
from __future__ import annotations

import numpy as np

from tasks.core import StageContext

CLASS_NAMES = {0: "6", 1: "6 rotated 180", 2: "7 (and rotated)"}


def write_figures(ctx: StageContext, runs: dict, info: dict, tables: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds in ("digits67", "rotated"):
        per = runs[ds]["vp"]
        labels = info["labels"][ds]
        layers = next(iter(per.values()))["subset"].shape[1]
        fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3), squeeze=False)
        for layer in range(layers):
            ax = axes[0, layer]
            for c, name in CLASS_NAMES.items():
                values = np.concatenate([r["subset"][labels == c, layer] for r in per.values()])
                ax.hist(values, bins=np.linspace(0, 1, 21), alpha=0.5, label=name)
            ax.set(xlabel="theta(x)", ylabel="test images (all seeds)", title=f"{ds}: group layer {layer + 1}")
        axes[0, 0].legend(fontsize=7)
        ctx.log_figure(fig, f"theta_histograms_{ds}.png")

    scores = tables["scores"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, metric in enumerate(("accuracy", "ece")):
        ax = axes[i]
        for j, (ds, by_model) in enumerate(scores.items()):
            models = list(by_model)
            xs = j * 6 + np.arange(len(models))
            ax.bar(xs, [by_model[m][metric]["mean"] for m in models],
                   yerr=[by_model[m][metric]["std"] for m in models], color=[f"C{k}" for k in range(len(models))])
            for x, m in zip(xs, models):
                ax.text(x, 0, m, rotation=90, fontsize=6, ha="center", va="bottom", color="w")
            ax.text(j * 6 + len(models) / 2 - 0.5, -0.08 if metric == "accuracy" else -0.01, ds, ha="center",
                    fontsize=8)
        ax.set_xticks([])
        ax.set(ylabel=metric, title=f"test {metric} (mean +- std over seeds)")
    if "digits67" in scores:
        axes[0].axhline(info["ceiling"], color="k", ls="--", lw=0.8)
    ctx.log_figure(fig, "accuracy_ece.png")

    cells = info["cell"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for m, ax in zip(("vp", "vp_bernoulli"), axes):
        if m not in runs["colour"]:
            continue
        kept = np.stack([r["subset"].mean(1) for r in runs["colour"][m].values()]).mean(0)
        per_cell = np.asarray([kept[cells == c].mean() for c in range(30)])
        colours = ["tab:red", "tab:green", "tab:blue"] * 10
        ax.bar(np.arange(30), per_cell, color=colours)
        ax.set_xticks(np.arange(1, 30, 3), [str(d) for d in range(10)])
        ax.set(xlabel="digit (bars: R, G, B cells)", ylabel="kept hue fraction", ylim=(0, 1.05),
               title=f"{m}: kept hue shifts per digit x colour (colour-dependent: "
                     f"{sorted(set((cells[info['colour_dependent']] // 3).tolist()))})")
        ax.title.set_fontsize(7)
    ctx.log_figure(fig, "kept_hue.png")
