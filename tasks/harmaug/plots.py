"""Figures of the harmaug evaluate stage (registers no stage)."""
from __future__ import annotations

import numpy as np

from tasks.core import io

METHOD_ORDER = ("teacher", "kd_only", "eda", "no_prefix", "harmaug")


def write_figures(ctx, scores: dict, curves: dict, gen: dict, seen: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_ORDER if m in scores]
    tests = list(scores["teacher"]["all"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(methods)
    rows = []
    for ax, metric in zip(axes, ("f1", "auprc")):
        for k, m in enumerate(methods):
            vals = np.array([[scores[m][s][t][metric] for t in tests] for s in scores[m]])
            ax.bar(np.arange(len(tests)) + k * width, vals.mean(0), width, yerr=vals.std(0), label=m)
            rows += [{"method": m, "test": t, "metric": metric, "value": float(v)} for t, v in zip(tests, vals.mean(0))]
        ax.set_xticks(np.arange(len(tests)) + 0.4 - width / 2, tests, rotation=20, fontsize=7)
        ax.set(ylabel=metric.upper(), ylim=(0, 1.05), title=f"{metric.upper()} per method and test set")
    axes[0].legend(fontsize=7)
    ctx.log_figure(fig, "f1_auprc.png")
    io.write_json(ctx.results_file("curves/scores.json"), rows)

    if gen:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        hist = gen["histogram"]
        cats = sorted({c for h in hist.values() for c in h}, key=lambda c: (len(c), c))
        for k, name in enumerate(("harmaug", "no_prefix")):
            counts = [hist.get(name, {}).get(c, 0) for c in cats]
            ax.bar(np.arange(len(cats)) + 0.4 * k, counts, 0.4, label=f"{name} (well-formed)")
        for i, c in enumerate(cats):
            if c in seen:
                ax.axvspan(i - 0.2, i + 0.6, color="0.9", zorder=0)
        ax.set_xticks(np.arange(len(cats)) + 0.2, cats, fontsize=7)
        ax.set(ylabel="instructions (all seeds)", title="category coverage of D̂ (grey: categories of D)")
        ax.legend(fontsize=7)
        ctx.log_figure(fig, "coverage.png")

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), squeeze=False)
    for ax, (test, by_method) in zip(axes[0], curves.items()):
        for m in methods:
            if m in by_method:
                prec, rec = by_method[m]
                ax.plot(rec, prec, label=m, lw=1.2)
        ax.set(xlabel="recall", ylabel="precision", title=test, xlim=(0, 1), ylim=(0, 1.02))
    axes[0][0].legend(fontsize=7)
    ctx.log_figure(fig, "precision_recall.png")
