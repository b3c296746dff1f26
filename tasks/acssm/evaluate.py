"""acssm evaluate: test scores per task, model and seed, the trivial references, the no-skip ablation,
the speed sweep, the lambda sweep (the ablation stage's, evidence only), claims by per-seed paired
confidence intervals, trajectory, latent and speed plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.acssm.common import TASK_NAMES, load_split, read_runs, run_dir
from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import Claim, Gate, all_of, gate, per_seed, t_interval
from tasks.metrics import mean_std

BASELINES = ("gru_dt", "latent_sde")
NAMES = {"acssm": "ACSSM", "acssm_noskip": "ACSSM without skip", "gru_dt": "GRU-dt",
         "latent_sde": "latent SDE (torchsde)", "majority_class": "majority class", "last_value": "last value",
         "linear_interpolation": "linear interpolation"}
TRIVIAL = {"classification": "majority_class", "regression": "last_value",
           "interpolation": "linear_interpolation", "extrapolation": "last_value"}
# every trivial reference of a task (on the future half, linear interpolation of the inputs is the last
# observed value carried forward, so extrapolation has one)
REFERENCES = {"classification": ("majority_class",), "regression": ("last_value", "linear_interpolation"),
              "interpolation": ("linear_interpolation", "last_value"), "extrapolation": ("last_value",)}
METRIC = {"classification": "per-time-point accuracy (higher is better)",
          "regression": "MSE of (sin, cos) (lower is better)",
          "interpolation": "masked MSE on held-out points, normalised units (lower is better)",
          "extrapolation": "masked MSE on the future half, normalised units (lower is better)"}


class EvaluateParams(Params):
    speedup_factor: float = Field(gt=1, description="margin of simulation_free_speedup: latent_sde / ACSSM "
                                  "seconds per epoch at the speed stage's claim_steps, one ratio per round")
    accuracy_margin: float = Field(ge=0, description="margin of acssm_beats_baselines_classification: "
                                   "ACSSM accuracy minus a baseline's, per seed")
    mse_margin: float = Field(ge=0, description="margin of the MSE claims: a baseline's MSE minus "
                              "ACSSM's, per seed")
    trivial_margin: float = Field(ge=0, lt=1, description="margin of acssm_beats_trivial: ACSSM's skill "
                                  "over each trivial reference of each task, per seed")
    min_skill: float = Field(lt=1, description="gate: ACSSM's skill over the task's trivial reference "
                             "(1 - MSE / reference MSE; accuracy gain / (1 - majority accuracy))")
    n_plot_series: int = Field(gt=0, description="test series drawn in the trajectory plots")


@dataclass
class Scores:
    """Test scores: per_seed[task][model] in the order of ``seeds``; trivial[task][reference] one number."""

    seeds: list[int]
    per_seed: dict[str, dict[str, list[float]]]
    trivial: dict[str, dict[str, float]]


def higher_is_better(task_name: str) -> bool:
    return task_name == "classification"


# ---------------------------------------------------------------------------------------------- load
def _score(task_name: str, pred, test: dict) -> float:
    from models.acssm.scores import accuracy, masked_mse

    if higher_is_better(task_name):
        return accuracy(pred, test["target"], test["target_mask"])
    return masked_mse(pred, test["target"], test["target_mask"])


def trivial_scores(task_name: str, train: dict, test: dict) -> dict[str, float]:
    """Every trivial reference of the task on the test split: the training split's majority class, the
    last observed input carried forward, per-channel linear interpolation of the observed inputs."""
    from models.acssm.scores import last_value_baseline, linear_interpolation_baseline

    if task_name == "classification":
        labels = train["target"].numpy()[train["target_mask"].numpy() > 0]
        majority = int(np.bincount(labels).argmax())
        hit = (test["target"].numpy() == majority) * test["target_mask"].numpy()
        return {"majority_class": float(hit.sum() / test["target_mask"].numpy().sum())}
    predictors = {"last_value": last_value_baseline, "linear_interpolation": linear_interpolation_baseline}
    return {ref: _score(task_name, predictors[ref](test), test) for ref in REFERENCES[task_name]}


def load_scores(data_dir: Path, fit_dir: Path, runs) -> Scores:
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
        trivial[task_name] = trivial_scores(task_name, to_tensors(load_split(data_dir, task_name, "train")), test)
    return Scores(seeds, per_seed, trivial)


# --------------------------------------------------------------------------------------------- claims
def skill(task_name: str, score: float, trivial: float) -> float:
    """Skill over a trivial reference: 1 - MSE / MSE_ref, or (acc - acc_ref) / (1 - acc_ref)."""
    if higher_is_better(task_name):
        return (score - trivial) / max(1.0 - trivial, 1e-12)
    return 1.0 - score / max(trivial, 1e-12)


def speed_ratios(speed: dict, steps: int) -> list[float]:
    """latent SDE / ACSSM seconds per epoch at ``steps`` Euler steps, one ratio per timing round."""
    return [s / a for s, a in zip(speed["latent_sde_seconds"][str(steps)], speed["acssm_seconds"])]


def beats_baselines(task_name: str, row: dict, g: Gate, p: EvaluateParams) -> Claim:
    sign = 1.0 if higher_is_better(task_name) else -1.0
    margin = p.accuracy_margin if higher_is_better(task_name) else p.mse_margin
    unit = "accuracy gain" if higher_is_better(task_name) else "MSE reduction"
    parts = {b: per_seed(f"acssm_beats_{b}_{task_name}", [sign * (a - o) for a, o in zip(row["acssm"], row[b])],
                         margin=margin, direction=">", gates=[g],
                         statement=f"ACSSM's {unit} over {NAMES[b]} on {task_name}, paired per seed")
             for b in BASELINES if b in row}
    return all_of(f"acssm_beats_baselines_{task_name}", parts, statement=f"ACSSM beats every baseline on {task_name}")


def beats_trivial(scores: Scores, p: EvaluateParams) -> Claim:
    parts = {f"{t}_{ref}": per_seed(f"acssm_beats_{ref}_{t}", [skill(t, a, value) for a in row["acssm"]],
                                    margin=p.trivial_margin, direction=">",
                                    statement=f"ACSSM's skill over {NAMES[ref]} on {t}, per seed")
             for t, row in scores.per_seed.items() if "acssm" in row
             for ref, value in scores.trivial[t].items()}
    return all_of("acssm_beats_trivial", parts, statement="ACSSM beats every trivial reference (majority "
                  "class, last value, linear interpolation) on every task")


def decide_claims(scores: Scores, speed: dict | None, p: EvaluateParams) -> tuple[list[Claim], list[Gate]]:
    """acssm_beats_baselines_<task>: all of (ACSSM vs each baseline, paired per seed), guarded by ACSSM's
    skill over the task's trivial reference; acssm_beats_trivial: ACSSM's skill over every trivial
    reference of every task; simulation_free_speedup: the speed stage's ratio at its claim_steps."""
    claims, gates = [], []
    for task_name, row in scores.per_seed.items():
        if "acssm" not in row or not set(BASELINES) & set(row):
            continue
        g = gate(f"{task_name}_skill_over_{TRIVIAL[task_name]}",
                 skill(task_name, float(np.mean(row["acssm"])), scores.trivial[task_name][TRIVIAL[task_name]]),
                 p.min_skill, description=f"ACSSM must beat the trivial reference ({TRIVIAL[task_name]})")
        gates.append(g)
        claims.append(beats_baselines(task_name, row, g, p))
    if any("acssm" in row for row in scores.per_seed.values()):
        claims.append(beats_trivial(scores, p))
    if speed:
        steps = speed["claim_steps"]
        claims.append(per_seed("simulation_free_speedup", speed_ratios(speed, steps), margin=p.speedup_factor,
                               direction=">", statement=f"latent SDE (torchsde, {steps} Euler steps per "
                               f"sequence) / ACSSM seconds per training epoch, each model timed alone in one "
                               f"process, one ratio per interleaved round"))
    return claims, gates


def skip_ablation(scores: Scores) -> dict:
    """ACSSM without the skip term (decoder sees only the latent sample) against ACSSM, paired per seed:
    the gain of the skip term (accuracy gain, or MSE reduction), mean and 95% t-interval."""
    out = {}
    for task_name, row in scores.per_seed.items():
        if "acssm" in row and "acssm_noskip" in row:
            sign = 1.0 if higher_is_better(task_name) else -1.0
            diffs = [sign * (a - b) for a, b in zip(row["acssm"], row["acssm_noskip"])]
            mean, low, high = t_interval(diffs)
            out[task_name] = {"skip_gain": mean, "ci": [low, high], "n": len(diffs), "per_seed": diffs,
                              "noskip_skill_over_trivial": skill(task_name, float(np.mean(row["acssm_noskip"])),
                                                                 scores.trivial[task_name][TRIVIAL[task_name]])}
    return out


# ---------------------------------------------------------------------------------------------- write
def summary_table(scores: Scores) -> dict:
    table = {}
    for task_name, row in scores.per_seed.items():
        table[task_name] = {m: {**mean_std(v), "per_seed": v} for m, v in row.items()}
        table[task_name].update({ref: {"mean": v} for ref, v in scores.trivial[task_name].items()})
    return table


def speed_summary(speed: dict) -> dict:
    """Per step count: median seconds per epoch of each model and the ratio's mean and 95% t-interval."""
    rows = {}
    for s in speed["steps"]:
        mean, low, high = t_interval(speed_ratios(speed, s))
        rows[str(s)] = {"sde_dt": speed["sde_dt"][str(s)], "acssm_sec": float(np.median(speed["acssm_seconds"])),
                        "latent_sde_sec": float(np.median(speed["latent_sde_seconds"][str(s)])),
                        "ratio": mean, "ratio_ci": [low, high]}
    keep = ("task", "series", "points", "horizon", "batch_size", "train_samples", "claim_steps", "threads")
    return {**{k: speed[k] for k in keep}, "rounds": len(speed["acssm_seconds"]), "per_steps": rows}


def headline_numbers(table: dict, speed: dict | None) -> dict:
    """The results table of docs/acssm.md: means over seeds per task and model, the speed sweep."""
    out = {}
    for task_name, row in table.items():
        label = f"{task_name} {'accuracy' if higher_is_better(task_name) else 'MSE'}"
        shown = [m for m in ("acssm", "acssm_noskip", *BASELINES) if m in row] + [TRIVIAL[task_name]]
        out[label] = {NAMES[m]: row[m]["mean"] for m in shown}
    if speed:
        out["latent SDE / ACSSM sec per epoch, by Euler steps per sequence"] = {
            s: r["ratio"] for s, r in speed["per_steps"].items()}
        at = speed["per_steps"][str(speed["claim_steps"])]
        out[f"sec per epoch at {speed['claim_steps']} steps"] = {"ACSSM": at["acssm_sec"],
                                                                 "latent SDE": at["latent_sde_sec"]}
    return out


def write_results(ctx: StageContext, scores: Scores, speed: dict | None, claims: list[Claim],
                  gates: list[Gate], lambda_sweep: dict | None = None) -> None:
    table = summary_table(scores)
    for task_name, row in table.items():
        ctx.log_metrics({f"{task_name}/{m}": v["mean"] for m, v in row.items()})
    ctx.log_metrics({f"claim/{c.name}/effect": c.effect for c in claims})
    summary = speed_summary(speed) if speed else None
    ctx.write_metrics(claims, gates, headline=headline_numbers(table, summary),
                      evidence={"test": table, "skip_ablation": skip_ablation(scores), "speed": summary,
                                "speed_raw": speed, "seeds": scores.seeds, "lambda_sweep": lambda_sweep,
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


def draw_speed(ctx: StageContext, summary: dict, margin: float) -> None:
    """Seconds per epoch and their ratio against the latent SDE's Euler steps per sequence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in summary["per_steps"]]
    rows = [summary["per_steps"][str(s)] for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(steps, [r["latent_sde_sec"] for r in rows], "o-", label="latent SDE (torchsde Euler)")
    axes[0].plot(steps, [r["acssm_sec"] for r in rows], "s--", label="ACSSM (closed form + scan)")
    axes[0].set_ylabel("seconds per training epoch (median)")
    ratio = np.array([r["ratio"] for r in rows])
    ci = np.array([r["ratio_ci"] for r in rows], dtype=float)
    axes[1].errorbar(steps, ratio, yerr=[ratio - ci[:, 0], ci[:, 1] - ratio], fmt="o-", capsize=3,
                     label="latent SDE / ACSSM (95% CI)")
    axes[1].axhline(margin, color="k", lw=0.8, ls=":", label=f"margin {margin:g}")
    axes[1].set_ylabel("speed-up")
    for ax in axes:
        ax.axvline(summary["claim_steps"], color="r", lw=0.8, ls="--", label="claim setting")
        ax.set_xscale("log")
        ax.set_xlabel(f"Euler steps per sequence (horizon {summary['horizon']:.2f}, {summary['task']})")
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['series']} series, batch {summary['batch_size']}, {summary['train_samples']} latent "
                 f"samples, {summary['threads']} thread, {summary['rounds']} interleaved rounds", fontsize=8)
    fig.tight_layout()
    ctx.log_figure(fig, "speed_sweep.png")
    io.write_json(ctx.results_file("curves/speed_sweep.json"),
                  [{"steps": s, "acssm_sec": r["acssm_sec"], "latent_sde_sec": r["latent_sde_sec"],
                    "ratio": r["ratio"]} for s, r in zip(steps, rows)])


def publish_lambda_sweep(ctx: StageContext, folder: Path) -> dict:
    """The ablation stage's lambda sweep into results/acssm: lambda_sweep.json, its plot and a curve
    (evidence only: no claim reads it)."""
    import shutil

    sweep = io.read_json(folder / "lambda_sweep.json")
    io.write_json(ctx.results_file("lambda_sweep.json"), sweep)
    shutil.copyfile(folder / "plots" / "lambda_sweep.png", ctx.results_file("plots/lambda_sweep.png"))
    io.write_json(ctx.results_file("curves/lambda_sweep.json"),
                  [{"lambda": r["lambda"], "mean": r["mean"], "low": r["ci"][0], "high": r["ci"][1]}
                   for r in sweep["rows"]])
    return sweep


@stage(params=EvaluateParams, inputs=("prepare", "finetune", "speed", "ablation"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Score every run, decide the claims by per-seed confidence intervals, draw the plots."""
    data_dir, fit_dir = ctx.input("prepare"), ctx.input("finetune")
    speed = io.read_json(ctx.input("speed") / "speed.json")
    scores = load_scores(data_dir, fit_dir, read_runs(fit_dir))
    claims, gates = decide_claims(scores, speed, p)
    sweep = publish_lambda_sweep(ctx, ctx.input("ablation"))
    write_results(ctx, scores, speed, claims, gates, sweep)
    draw_figures(ctx, data_dir, fit_dir, list(scores.per_seed), scores.seeds[0], p.n_plot_series)
    draw_speed(ctx, speed_summary(speed), p.speedup_factor)
