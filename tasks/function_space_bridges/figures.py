"""Plots of the function_space_bridges evaluation: transported images at both resolutions, 1-D function
samples at every grid, the SOC posterior bands against the exact GP posterior."""
from __future__ import annotations

import numpy as np

from tasks.core import io


def write_figures(ctx, rows: list[dict], examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = rows[0]["functions"]["grids"]
    curve = [{"grid": n, "model": model, "mmd2": float(np.mean([r["functions"][str(n)][model]["mmd2"] for r in rows]))}
             for n in grids for model in ("first", "first_equal_steps", "final")]
    io.write_json(ctx.results_file("curves/mmd_vs_grid.json"), curve)

    images = examples["images"]
    res = list(images)
    fig, axes = plt.subplots(2 * len(res), 8, figsize=(8, 2 * len(res)), squeeze=False)
    for r, size in enumerate(res):
        for c in range(min(8, len(images[size]["source"]))):
            for k, key in enumerate(("source", "moved")):
                img = images[size][key][c]
                img = img[0] if img.shape[0] == 1 else np.clip((img.transpose(1, 2, 0) + 1) / 2, 0, 1)
                ax = axes[2 * r + k, c]
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
            axes[2 * r, 0].set_ylabel(f"A {size}px", fontsize=7)
            axes[2 * r + 1, 0].set_ylabel(f"A->B {size}px", fontsize=7)
    fig.suptitle("transported digits (seed 0): trained at the first resolution, run zero-shot at the second",
                 fontsize=8)
    ctx.log_figure(fig, "transported_images.png")

    functions = examples["functions"]
    fig, axes = plt.subplots(2, len(functions), figsize=(3.2 * len(functions), 4.5), squeeze=False)
    for c, n in enumerate(functions):
        x = (np.arange(int(n)) + 0.5) / int(n)
        for k, key in enumerate(("source", "moved")):
            for f in functions[n][key]:
                axes[k, c].plot(x, f, lw=1)
        axes[0, c].set_title(f"{n} points", fontsize=8)
    axes[0, 0].set_ylabel("GP path (source)", fontsize=8)
    axes[1, 0].set_ylabel("transported (density)", fontsize=8)
    fig.suptitle("1-D bridge GP -> Gaussian-mixture densities, trained on the first grid (seed 0)", fontsize=8)
    ctx.log_figure(fig, "function_samples.png")

    post = examples["posterior"]
    n = len(post["mean"])
    x = (np.arange(n) + 0.5) / n
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, std, label, color in (("exact_mean", "exact_std", "exact GP posterior", "k"),
                                   ("mean", "std", "SOC control", "tab:orange")):
        ax.plot(x, post[key], color=color, label=label)
        ax.fill_between(x, post[key] - 2 * post[std], post[key] + 2 * post[std], color=color, alpha=0.2)
    obs = post["mask"] > 0
    ax.scatter(x[obs], post["y"][obs], color="tab:blue", zorder=3, label="observations")
    ax.set(xlabel="x", ylabel="f(x)", title="GP-regression posterior: mean +- 2 std (seed 0, task 0)")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "gp_posterior.png")
