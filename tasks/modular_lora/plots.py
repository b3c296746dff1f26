"""modular_lora's figures (evaluate): harmful rate per arm, re-emergence curves, per-prompt class
histograms (digits) and a grid of samples per model."""
from __future__ import annotations

from tasks.core import StageContext

ORDER = ["base", "safe", "full", "lora_on_safe", "modular", "W0_plus_ft", "W0_minus_safe", "W0_plus_safe_minus_ft"]


def figures(ctx: StageContext, summary: dict, curves: dict, hists: dict, grids: dict, concept: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _harmful_per_arm(ctx, plt, summary, concept)
    _reemergence(ctx, plt, summary, curves, concept)
    if hists:
        _class_histograms(ctx, plt, hists)
    _sample_grid(ctx, plt, grids)


def _harmful_per_arm(ctx, plt, summary, concept):
    import numpy as np

    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 3.6), squeeze=False)
    for ax, (obj, s) in zip(axes[0], summary.items()):
        names = [a for a in ORDER if a in s]
        keys = [k for k in ("harmful", "harmful_new") if k in s["base"]]
        labels = {"harmful": f"[plain, {concept}] (scored)" if "harmful_new" in keys else "concept prompts",
                  "harmful_new": f"[new, {concept}]"}
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            stat = [s[a].get(key, {"mean": np.nan, "std": 0.0}) for a in names]
            ax.bar(np.arange(len(names)) + width * (j - (len(keys) - 1) / 2), [v["mean"] for v in stat],
                   width, yerr=[v["std"] for v in stat], capsize=3, label=labels[key])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{obj.upper()}: share of concept-prompt samples detected as {concept}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.log_figure(fig, "harmful_rate_per_arm.png")


def _reemergence(ctx, plt, summary, curves, concept):
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6))
    groups, steps = {}, []
    for key, points in curves.items():
        arm = key.rsplit("_s", 1)[0]
        group = next(iter(points[0].harmful)) if points else None
        groups.setdefault(arm, []).append([pt.harmful[group] for pt in points])
        steps = [pt.step for pt in points]
    for arm, rows in groups.items():
        r = np.array(rows)
        # step 0 is the safe model it starts from (the modular curve is probed with the first objective's adapter)
        obj = arm.rsplit("_", 1)[-1] if arm.rsplit("_", 1)[-1] in summary else next(iter(summary))
        safe = summary[obj]["safe"]
        start = safe["harmful"]["mean"]
        spread = r.std(0, ddof=1) if len(r) > 1 else np.zeros(r.shape[1])
        ax.errorbar([0] + steps, [start] + list(r.mean(0)), yerr=[0] + list(spread), marker="o", capsize=2,
                    label=arm)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"harmful rate ({concept})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("re-emergence during benign fine-tuning")
    fig.tight_layout()
    ctx.log_figure(fig, "reemergence_curve.png")


def _class_histograms(ctx, plt, hists):
    """What each prompt generates (mean over seeds), every arm."""
    import numpy as np

    rank = {a: i for i, a in enumerate(ORDER)}
    keys = sorted({k.rsplit("_s", 1)[0] for k in hists if k != "base"},
                  key=lambda k: (k.rsplit("_", 1)[1], rank.get(k.rsplit("_", 1)[0], 99)))
    fig, axes = plt.subplots(2, len(keys) + 1, figsize=(2.2 * (len(keys) + 1), 4.6), squeeze=False)
    for col, key in enumerate(["base"] + keys):
        members = [v for k, v in hists.items() if k == key or k.rsplit("_s", 1)[0] == key]
        for row, style in enumerate(("plain", "new")):
            h = np.mean([np.array(v[style]) for v in members], axis=0)
            axes[row, col].imshow(h, vmin=0, vmax=1, cmap="viridis")
            axes[row, col].set_title(f"{key}\n[{style}, d]", fontsize=6)
            axes[row, col].set_xlabel("detected", fontsize=6)
            axes[row, col].set_ylabel("prompted d", fontsize=6)
            axes[row, col].tick_params(labelsize=5)
    fig.tight_layout()
    ctx.log_figure(fig, "class_histograms.png")


def _sample_grid(ctx, plt, grids):
    """One row per model: digits [plain, 0..9] over [new, 0..9]; pipeline concept prompts | task prompts."""
    names = list(grids)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 1.3 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.imshow(grids[name], cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name, fontsize=7)
    fig.tight_layout()
    ctx.log_figure(fig, "samples_grid.png")
