"""acssm evaluate: test scores per task, model and seed, the trivial references, the speed ratio,
claims by per-seed paired confidence intervals, trajectory and latent-variance plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.acssm.common import TASK_NAMES, RunSummary, load_split, read_runs, run_dir
from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import Claim, Gate, all_of, gate, per_seed
from tasks.metrics import mean_std

BASELINES = ("gru_dt", "latent_sde")
NAMES = {"acssm": "ACSSM", "gru_dt": "GRU-dt", "latent_sde": "latent SDE (torchsde)",
         "majority_class": "majority class", "last_value": "last value", "linear_interpolation": "linear interpolation"}
TRIVIAL = {"classification": "majority_class", "regression": "last_value",
           "interpolation": "linear_interpolation", "extrapolation": "last_value"}
METRIC = {"classification": "per-time-point accuracy (higher is better)",
          "regression": "MSE of (sin, cos) (lower is better)",
          "interpolation": "masked MSE on held-out points, normalised units (lower is better)",
          "extrapolation": "masked MSE on the future half, normalised units (lower is better)"}


class EvaluateParams(Params):
    speedup_factor: float = Field(gt=1, description="margin of simulation_free_speedup: the per-seed mean "
                                  "over tasks of latent_sde / ACSSM sec per epoch must exceed it")
    accuracy_margin: float = Field(ge=0, description="margin of acssm_beats_baselines_classification: "
                                   "ACSSM accuracy minus a baseline's, per seed")
    mse_margin: float = Field(ge=0, description="margin of the MSE claims: a baseline's MSE minus "
                              "ACSSM's, per seed")
    min_skill: float = Field(lt=1, description="gate: ACSSM's skill over the task's trivial reference "
                             "(1 - MSE / reference MSE; accuracy gain / (1 - majority accuracy))")
    n_plot_series: int = Field(gt=0, description="test series drawn in the trajectory plots")


@dataclass
class Scores:
    """Test scores: per_seed[task][model] in the order of ``seeds``; trivial[task] one number."""

    seeds: list[int]
    per_seed: dict[str, dict[str, list[float]]]
    trivial: dict[str, float]


def higher_is_better(task_name: str) -> bool:
    return task_name == "classification"


# ---------------------------------------------------------------------------------------------- load
def _score(task_name: str, pred, test: dict) -> float:
    from models.acssm.scores import accuracy, masked_mse

    if higher_is_better(task_name):
        return accuracy(pred, test["target"], test["target_mask"])
    return masked_mse(pred, test["target"], test["target_mask"])


def _trivial_score(task_name: str, test: dict) -> float:
    from models.acssm.scores import last_value_baseline, linear_interpolation_baseline

    if task_name == "classification":
        counts = np.bincount(test["target"].numpy().ravel())
        return float(counts.max() / counts.sum())
    reference = linear_interpolation_baseline if task_name == "interpolation" else last_value_baseline
    return _score(task_name, reference(test), test)


def load_scores(data_dir: Path, fit_dir: Path, runs: list[RunSummary]) -> Scores:
    import torch

    from models.acssm.scores import to_tensors

    tasks = sorted({r.task for r in runs}, key=TASK_NAMES.index)
    models = sorted({r.model for r in runs})
    seeds = sorted({r.seed for r in runs})
    per_seed, trivial = {}, {}
    for task_name in tasks:
        test = to_tensors(load_split(data_dir, task_name, "test"))
        per_seed[task_name] = {
            m: [_score(task_name, torch.as_tensor(io.load_arrays(
                run_dir(fit_dir, task_name, m, s) / "test_predictions.npz")["pred"]), test) for s in seeds]
            for m in models}
        trivial[task_name] = _trivial_score(task_name, test)
    return Scores(seeds, per_seed, trivial)


def speed_ratios(runs: list[RunSummary], seeds: list[int]) -> dict[str, dict[int, float]]:
    """latent_sde / ACSSM median sec per epoch, same task and seed: ratios[task][seed]."""
    by = {(r.task, r.model, r.seed): r.sec_per_epoch_median for r in runs}
    tasks = sorted({r.task for r in runs}, key=TASK_NAMES.index)
    return {t: {s: by[(t, "latent_sde", s)] / by[(t, "acssm", s)] for s in seeds}
            for t in tasks if all((t, m, s) in by for m in ("acssm", "latent_sde") for s in seeds)}


# --------------------------------------------------------------------------------------------- claims
def skill(task_name: str, acssm_mean: float, trivial: float) -> float:
    """ACSSM's skill over the trivial reference: 1 - MSE / MSE_ref, or (acc - acc_ref) / (1 - acc_ref)."""
    if higher_is_better(task_name):
        return (acssm_mean - trivial) / max(1.0 - trivial, 1e-12)
    return 1.0 - acssm_mean / max(trivial, 1e-12)


def decide_claims(scores: Scores, ratios: dict[str, dict[int, float]],
                  p: EvaluateParams) -> tuple[list[Claim], list[Gate]]:
    """acssm_beats_baselines_<task>: all of (ACSSM vs each baseline, paired per seed), guarded by
    ACSSM's skill over the trivial reference; simulation_free_speedup: per-seed mean speed ratio."""
    claims, gates = [], []
    for task_name, row in scores.per_seed.items():
        if "acssm" not in row or not set(BASELINES) & set(row):
            continue
        g = gate(f"{task_name}_skill_over_{TRIVIAL[task_name]}",
                 skill(task_name, float(np.mean(row["acssm"])), scores.trivial[task_name]), p.min_skill,
                 description=f"ACSSM must beat the trivial reference ({TRIVIAL[task_name]})")
        gates.append(g)
        sign = 1.0 if higher_is_better(task_name) else -1.0
        margin = p.accuracy_margin if higher_is_better(task_name) else p.mse_margin
        unit = "accuracy gain" if higher_is_better(task_name) else "MSE reduction"
        parts = {b: per_seed(f"acssm_beats_{b}_{task_name}",
                             [sign * (a - o) for a, o in zip(row["acssm"], row[b])], margin=margin,
                             direction=">", gates=[g],
                             statement=f"ACSSM's {unit} over {NAMES[b]} on {task_name}, paired per seed")
                 for b in BASELINES if b in row}
        claims.append(all_of(f"acssm_beats_baselines_{task_name}", parts,
                             statement=f"ACSSM beats every baseline on {task_name}"))
    if ratios:
        per_seed_ratio = [float(np.mean([ratios[t][s] for t in ratios])) for s in scores.seeds]
        claims.append(per_seed("simulation_free_speedup", per_seed_ratio, margin=p.speedup_factor,
                               direction=">", statement="latent SDE (torchsde) / ACSSM seconds per epoch, "
                               "mean over tasks, one ratio per seed"))
    return claims, gates


# ---------------------------------------------------------------------------------------------- write
def summary_table(scores: Scores) -> dict:
    table = {}
    for task_name, row in scores.per_seed.items():
        table[task_name] = {m: {**mean_std(v), "per_seed": v} for m, v in row.items()}
        table[task_name][TRIVIAL[task_name]] = {"mean": scores.trivial[task_name]}
    return table


def headline_numbers(table: dict, ratios: dict[str, dict[int, float]]) -> dict:
    """The results table of docs/acssm.md: means over seeds and the speed ratio (21 numbers)."""
    out = {}
    for task_name, row in table.items():
        label = f"{task_name} {'accuracy' if higher_is_better(task_name) else 'MSE'}"
        out[label] = {NAMES[m]: v["mean"] for m, v in row.items()}
    if ratios:
        speed = {t: float(np.mean(list(r.values()))) for t, r in ratios.items()}
        out["latent SDE / ACSSM sec per epoch"] = {**speed, "mean": float(np.mean(list(speed.values())))}
    return out


def speed_evidence(runs: list[RunSummary], ratios: dict[str, dict[int, float]]) -> dict:
    def mean_of(model: str, task_name: str) -> float:
        return float(np.mean([r.sec_per_epoch_median for r in runs if r.task == task_name and r.model == model]))

    flat = [v for r in ratios.values() for v in r.values()]
    return {"latent_sde_over_acssm_sec_per_epoch": float(np.mean(flat)) if flat else None,
            "min": float(np.min(flat)) if flat else None,
            "per_task_per_seed": ratios,
            "acssm_sec_per_epoch": {t: mean_of("acssm", t) for t in ratios},
            "latent_sde_sec_per_epoch": {t: mean_of("latent_sde", t) for t in ratios}}


def write_results(ctx: StageContext, scores: Scores, runs: list[RunSummary],
                  ratios: dict[str, dict[int, float]], claims: list[Claim], gates: list[Gate]) -> None:
    table = summary_table(scores)
    for task_name, row in table.items():
        ctx.log_metrics({f"{task_name}/{m}": v["mean"] for m, v in row.items()})
    ctx.log_metrics({f"claim/{c.name}/effect": c.effect for c in claims})
    ctx.write_metrics(claims, gates, headline=headline_numbers(table, ratios),
                      evidence={"test": table, "speed": speed_evidence(runs, ratios), "seeds": scores.seeds,
                                "metric": {t: METRIC[t] for t in table}})


# -------------------------------------------------------------------------------------------- figures
def draw_figures(ctx: StageContext, data_dir: Path, fit_dir: Path, tasks: list[str], seed: int,
                 n_series: int) -> None:
    """Per regression-type task: ACSSM trajectories with +-2 sd bands (seed ``seed``), the latent mean
    and variance of series 0, and the latent-variance curve as results/acssm/curves/*.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task_name in [t for t in tasks if t != "classification"]:
        test = load_split(data_dir, task_name, "test")
        pred = io.load_arrays(run_dir(fit_dir, task_name, "acssm", seed) / "test_predictions.npz")
        n = min(n_series, test["times"].shape[0])
        fig, axes = plt.subplots(n, 2, figsize=(10, 2.4 * n), squeeze=False)
        for i in range(n):
            t = test["times"][i]
            for c in range(min(2, test["target"].shape[-1])):
                ax = axes[i, c]
                mu, sd = pred["pred"][i, :, c], pred["std"][i, :, c]
                ax.fill_between(t, mu - 2 * sd, mu + 2 * sd, alpha=0.25, label="ACSSM +-2 sd")
                ax.plot(t, mu, label="ACSSM mean")
                ax.plot(t, test["target"][i, :, c], "k.", ms=3, label="truth")
                obs = test["mask"][i, :, c] > 0
                ax.plot(t[obs], test["values"][i, obs, c], "rx", ms=4, label="observed input")
                ax.set_title(f"{task_name} series {i} channel {c}", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        ctx.log_figure(fig, f"trajectories_{task_name}.png")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3))
        t = test["times"][0]
        axes[0].plot(t, pred["latent_mean"][0][:, :4])
        axes[0].set_title(f"{task_name}: latent mean (4 dims), series 0", fontsize=8)
        axes[1].plot(t, pred["latent_var"][0][:, :4])
        axes[1].set_title("latent variance (eigen-coords)", fontsize=8)
        for ax in axes:
            ax.set_xlabel("time")
        fig.tight_layout()
        ctx.log_figure(fig, f"latent_{task_name}.png")
        io.write_json(ctx.results_file(f"curves/latent_variance_{task_name}.json"),
                      [{"time": float(a), "variance": float(b)} for a, b in zip(t, pred["latent_var"][0].mean(-1))])


@stage(params=EvaluateParams, inputs=("prepare", "finetune"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Score every run, decide the claims by per-seed confidence intervals, draw the plots."""
    data_dir, fit_dir = ctx.input("prepare"), ctx.input("finetune")
    runs = read_runs(fit_dir)
    scores = load_scores(data_dir, fit_dir, runs)
    ratios = speed_ratios(runs, scores.seeds)
    claims, gates = decide_claims(scores, ratios, p)
    write_results(ctx, scores, runs, ratios, claims, gates)
    draw_figures(ctx, data_dir, fit_dir, list(scores.per_seed), scores.seeds[0], p.n_plot_series)
