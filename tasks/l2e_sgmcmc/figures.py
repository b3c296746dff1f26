"""The evaluate stage's plots: meta-validation curve, NLL vs number of samples, disagreement and mode
count, loss along straight paths between samples."""
from __future__ import annotations

import numpy as np

from tasks.core import io

COLOURS = {"l2e": "C3", "l2e_untrained": "C1", "sghmc": "C7", "csghmc": "C0", "ensemble": "C2"}


def write_figures(ctx, rows: list[dict], curves: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    io.write_json(ctx.results_file("curves/meta_validation.json"), curves)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in dict.fromkeys(c["multiplier"] for c in curves):
        for phase, style in (("screen", "--"), ("train", "-")):
            pts = [c for c in curves if c["multiplier"] == m and c["phase"] == phase]
            if pts:
                ax.plot([c["iteration"] for c in pts], [c["score"] for c in pts], style, marker="o", ms=3,
                        label=f"multiplier {m:g} ({phase})")
    ax.set(xlabel="outer iteration", ylabel="meta-validation BMA NLL / log(classes)",
           title=f"L2E meta-training (chosen multiplier {meta['multiplier']:g})")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "meta_validation.png")

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(rows[0]["methods"])
    points = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in methods:
            curve = np.mean([c["nll_vs_samples"] for r in rows if r["task"] == t for c in r["methods"][m]["chains"]], 0)
            points += [{"task": t, "method": m, "samples": k + 1, "nll": float(v)} for k, v in enumerate(curve)]
            ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", ms=3, color=COLOURS.get(m), label=m)
        ax.set(title=t, xlabel="samples in the model average", ylabel="BMA test NLL")
    axes[0, 0].legend(fontsize=7)
    io.write_json(ctx.results_file("curves/nll_vs_samples.json"), points)
    ctx.log_figure(fig, "nll_vs_samples.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        for ax, key in zip(axes, ("disagreement", "modes")):
            vals = [np.mean([c[key] for r in rows if r["task"] == t for c in r["methods"][m]["chains"]]) for t in tasks]
            ax.bar(np.arange(len(tasks)) + i * width, vals, width, color=COLOURS.get(m), label=m)
    for ax, label in zip(axes, ("pairwise disagreement of samples", "modes among the samples (barriers)")):
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8)
        ax.set(ylabel=label)
    axes[0].legend(fontsize=7)
    ctx.log_figure(fig, "disagreement.png")

    row = rows[-1]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in ("l2e", "csghmc", "ensemble"):
        for j, path in enumerate(row["methods"][m]["path_losses"]):
            ax.plot(np.linspace(0, 1, len(path)), path, color=COLOURS[m], alpha=0.6, label=m if j == 0 else None)
    ax.set(xlabel="position on the straight path between two samples", ylabel="validation NLL",
           title=f"{row['name']}: loss between samples (first chain)")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "loss_paths.png")
