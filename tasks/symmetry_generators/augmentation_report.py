"""The FNO augmentation part of evaluate: per-seed effects, the gate, the claim, the NMSE plot.

Effects are per seed, the mean over test trajectories of a log NMSE ratio (paired: the same training
subset, initialisation and test trajectories for every method of a seed):
* ``learned_below_none``: log(NMSE_none / NMSE_learned) > margin (learned augmentation helps);
* ``learned_near_known``: log(NMSE_learned / NMSE_known) < margin (no worse than the known symmetries
  by more than the margin).
The gate ``known_augmentation_helps`` (lower end of the 95% CI of log(NMSE_none / NMSE_known) above its
threshold) says the data regime is one where augmentation matters at all; when it fails the claim is
null with that reason (the CI cannot resolve an augmentation effect at this scale).
"""
from __future__ import annotations

import numpy as np

from tasks.core.claims import all_of, gate, per_seed, t_interval

METHODS = ("none", "known", "learned")


def nmse_by_seed(runs: list[dict]) -> dict[int, dict[str, np.ndarray]]:
    """{seed: {method: NMSE per test trajectory}}."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for run in runs:
        out.setdefault(run["seed"], {})[run["method"]] = np.asarray(run["nmse"], dtype=float)
    return out


def log_ratio(table: dict, a: str, b: str) -> list[float]:
    """Per seed: mean over test trajectories of log(NMSE_a / NMSE_b)."""
    return [float(np.mean(np.log(t[a] / t[b]))) for t in table.values()]


def decide_augmentation(runs: list[dict], helps_margin: float, equivalence_margin: float,
                        gate_threshold: float):
    table = nmse_by_seed(runs)
    _, known_low, _ = t_interval(log_ratio(table, "none", "known"))
    regime = gate("known_augmentation_helps", known_low if np.isfinite(known_low) else -np.inf,
                  gate_threshold, ">=", "lower end of the 95% CI over seeds of log(NMSE_none / NMSE_known): "
                                        "augmentation with the known symmetries must help in this regime")
    claim = all_of("augmentation_helps_low_data", {
        "learned_below_none": per_seed(
            "learned_below_none", log_ratio(table, "none", "learned"), margin=helps_margin, gates=[regime],
            statement="log(NMSE_none / NMSE_learned), mean over test trajectories"),
        "learned_near_known": per_seed(
            "learned_near_known", log_ratio(table, "learned", "known"), margin=equivalence_margin,
            direction="<", gates=[regime],
            statement="log(NMSE_learned / NMSE_known), mean over test trajectories")},
        statement="FNO rollout NMSE with learned-generator augmentation below no augmentation and within "
                  f"exp({equivalence_margin}) of the known symmetries' (few training trajectories)")
    return claim, regime


def headline(runs: list[dict]) -> dict:
    table = nmse_by_seed(runs)
    return {m: float(np.mean([t[m].mean() for t in table.values()])) for m in METHODS}


def evidence(runs: list[dict]) -> dict:
    table = nmse_by_seed(runs)
    summary = {m: {"mean_per_seed": [float(t[m].mean()) for t in table.values()]} for m in METHODS}
    ratios = {f"log_{a}_over_{b}": log_ratio(table, a, b)
              for a, b in (("none", "known"), ("none", "learned"), ("learned", "known"))}
    extra = [{k: v for k, v in run.items() if k not in ("nmse", "curve")} for run in runs]
    return {"nmse": summary, "log_ratios_per_seed": ratios, "runs": extra}


def write_figure(ctx, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.core import io

    table = nmse_by_seed(runs)
    points = [{"method": m, "seed": int(seed), "nmse": float(t[m].mean())}
              for seed, t in table.items() for m in METHODS]
    io.write_json(ctx.results_file("curves/nmse_by_method.json"), points)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for seed, t in table.items():
        ax.plot(range(len(METHODS)), [t[m].mean() for m in METHODS], color="0.6", marker="o", lw=0.8)
    means = [np.mean([t[m].mean() for t in table.values()]) for m in METHODS]
    ax.plot(range(len(METHODS)), means, color="k", marker="s", lw=2, label="mean over seeds")
    ax.set_xticks(range(len(METHODS)), [f"{m}\naugmentation" for m in METHODS])
    ax.set(ylabel="rollout NMSE (test trajectories)", title="FNO on KdV, few training trajectories")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "nmse_by_method.png")
