"""acssm stages: prepare (irregular data sets) -> finetune (ACSSM + baselines, all tasks and seeds)
-> evaluate (masked MSE / accuracy, trivial references, speed ratio, claims, plots)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage
from tasks.data import acssm_series as series

PAPER = "acssm"
TASK_NAMES = ("classification", "regression", "interpolation", "extrapolation")
ModelName = Literal["acssm", "gru_dt", "latent_sde"]
TaskName = Literal["classification", "regression", "interpolation", "extrapolation"]


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------
class PrepareParams(Params):
    source: Literal["synthetic", "paper"] = Field("synthetic", description="synthetic+statsmodels (CPU) or the "
                                                  "paper's data sets from local files (paper scale)")
    data_dir: str = Field("", description="paper scale: folder with the published files (see docs/acssm.md)")
    n_train: int = Field(400, gt=0, description="training series for the synthetic tasks")
    n_test: int = Field(200, gt=0, description="test series for the synthetic tasks")
    classification_points: int = Field(50, ge=4, description="grid points of a regime-switching series")
    classification_keep: int = Field(25, ge=2, description="time points kept per series")
    pendulum_points: int = Field(100, ge=4, description="grid points of a pendulum series (dt 0.05)")
    pendulum_keep: int = Field(50, ge=2, description="time points kept per series")
    missing: float = Field(0.2, ge=0, lt=1, description="per-channel missingness of the inputs")
    real_window: int = Field(48, ge=8, description="months per window of the real series")
    real_stride: int = Field(4, gt=0, description="months between window starts")
    real_draws: int = Field(6, gt=0, description="irregular subsamplings per window")
    real_keep: float = Field(0.5, gt=0, le=1, description="fraction of months kept per draw")
    impute_rate: float = Field(0.3, gt=0, lt=1, description="interpolation: fraction of kept points hidden")


@stage(PAPER, "prepare", params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    if p.classification_keep > p.classification_points or p.pendulum_keep > p.pendulum_points:
        raise ValueError("acssm.prepare: *_keep must not exceed *_points")
    seed = ctx.seed
    meta = {}
    if p.source == "paper":
        from tasks.data import acssm_paper
        built = acssm_paper.build_all(Path(p.data_dir), seed)
    else:
        sets = {
            "classification": lambda n, s: series.regime_switching(
                n, s, p.classification_points, p.classification_keep, missing=p.missing),
            "regression": lambda n, s: series.pendulum(n, s, p.pendulum_points, p.pendulum_keep,
                                                       missing=p.missing),
        }
        built = {name: {"train": fn(p.n_train, seed * 10 + 1), "test": fn(p.n_test, seed * 10 + 2)}
                 for name, fn in sets.items()}
        raw, channels = series.co2_elnino_monthly()
        for mode in ("interpolation", "extrapolation"):
            kw = dict(mode=mode, window=p.real_window, stride=p.real_stride, draws=p.real_draws,
                      keep=p.real_keep, missing=p.missing, impute_rate=p.impute_rate)
            tr = series.real_windows(raw, seed, "train", **kw)
            te = series.real_windows(raw, seed, "test", **kw)
            scale = series.centred_scale(tr)
            built[mode] = {"train": series.scale_channels(tr, scale), "test": series.scale_channels(te, scale)}
            meta[mode] = {"channels": channels, "scale": scale.tolist(), "source": "statsmodels co2 + elnino"}
    for name, splits in built.items():
        task_meta = meta.setdefault(name, {})
        for split, data in splits.items():
            io.save_arrays(ctx.out_dir / f"{name}_{split}.npz", **data)
            task_meta[f"n_{split}"] = int(data["times"].shape[0])
            task_meta["points"] = int(data["times"].shape[1])
            task_meta["obs_dim"] = int(data["values"].shape[-1])
        task_meta["task"] = "classification" if name == "classification" else "regression"
        task_meta["out_dim"] = int(splits["train"]["target"].max()) + 1 if name == "classification" \
            else int(splits["train"]["target"].shape[-1])
    io.write_json(ctx.out_dir / "meta.json", meta)


def load_split(folder: Path, name: str, split: str) -> dict:
    return io.load_arrays(folder / f"{name}_{split}.npz")


# --------------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------------
class FinetuneParams(Params):
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_NAMES), min_length=1)
    models: list[ModelName] = Field(default_factory=lambda: ["acssm", "gru_dt", "latent_sde"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: int = Field(15, gt=0)
    batch_size: int = Field(100, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm (0 = off)")
    width: int = Field(32, gt=0, description="encoder / decoder width")
    state_dim: int = Field(16, gt=0, description="latent SDE dimension (same for ACSSM and latent_sde)")
    num_basis: int = Field(8, gt=0, description="negative-definite bases in the drift mixture")
    n_layers: int = Field(1, gt=0, description="Transformer encoder layers")
    n_heads: int = Field(2, gt=0)
    time_scale: float = Field(1.0, gt=0, description="time-encoding scale (ts)")
    skip: bool = Field(True, description="decoder also sees z_k (the official 'skip' term)")
    obs_var: float = Field(0.01, gt=0, description="fixed variance of the Gaussian decoder")
    lambda_control: float = Field(1e-6, ge=0, description="weight of 1/2 sum ||alpha||^2 dt (official 1e-6)")
    lambda_potential: float = Field(1e-8, ge=0, description="weight of -log g potential (official 1e-8)")
    train_samples: int = Field(3, gt=0, description="latent samples per series in training")
    eval_samples: int = Field(16, gt=0, description="latent samples per series at test time")
    sde_dt: float = Field(0.05, gt=0, description="torchsde Euler step of the latent_sde baseline")
    num_threads: int = Field(1, gt=0, description="torch threads (1 is much faster on a loaded 2-core box)")
    workers: int = Field(1, gt=0, description="processes training independent (task, model, seed) runs "
                                              "in parallel, one torch thread each (CPU: one per core)")


def model_config(p: FinetuneParams) -> dict:
    return dict(width=p.width, state_dim=p.state_dim, num_basis=p.num_basis, n_layers=p.n_layers,
                n_heads=p.n_heads, time_scale=p.time_scale, skip=p.skip, sde_dt=p.sde_dt, obs_var=p.obs_var)


@stage(PAPER, "finetune", params=FinetuneParams, inputs=("prepare",), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    if p.width % p.n_heads:
        raise ValueError(f"acssm.finetune.width ({p.width}) must be divisible by n_heads ({p.n_heads})")
    import torch

    torch.set_num_threads(p.num_threads)
    src = ctx.input("prepare")
    jobs = [dict(task=t, model=m, seed=s, src=str(src), out=str(ctx.out_dir / t / m / f"seed{s}"),
                 device=str(ctx.device), params=p.model_dump(mode="json"))
            for t in p.tasks for s in p.seeds for m in p.models]

    def log(i: int, res: dict) -> None:
        tag = f"{res['task']}/{res['model']}/s{res['seed']}"
        for rec in res.pop("history"):
            ctx.log_metrics({f"{tag}/loss": rec["loss"], f"{tag}/sec_per_epoch": rec["seconds"]},
                            step=rec["epoch"])

    summary = ctx.map(fit_one, jobs, workers=p.workers, desc="acssm finetune", on_result=log)
    io.write_json(ctx.out_dir / "runs.json", summary)


def fit_one(job: dict) -> dict:
    """One (task, model, seed) training: a top-level function so that worker processes can run it."""
    import torch
    from safetensors.torch import save_file

    from models.acssm import LossWeights
    from tasks.acssm_fit import build_model, predict, to_tensors, train_model

    p = FinetuneParams(**job["params"])
    task_name, model_name, seed = job["task"], job["model"], job["seed"]
    src, device = Path(job["src"]), torch.device(job["device"])
    info = io.read_json(src / "meta.json")[task_name]
    tr = to_tensors(load_split(src, task_name, "train"), device)
    te = to_tensors(load_split(src, task_name, "test"), device)
    torch.manual_seed(seed)
    model = build_model(model_name, info["task"], info["obs_dim"], info["out_dim"], model_config(p),
                        causal=(task_name == "extrapolation")).to(device)
    samples = 1 if model_name == "gru_dt" else p.train_samples
    hist = train_model(model, tr, p.epochs, p.batch_size, p.lr, p.weight_decay,
                       LossWeights(p.lambda_control, p.lambda_potential), samples, seed, p.grad_clip)
    out = predict(model, te, 1 if model_name == "gru_dt" else p.eval_samples)
    run_dir = Path(job["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              run_dir / "model.safetensors")
    io.save_arrays(run_dir / "test_predictions.npz", **{k: v.cpu().numpy() for k, v in out.items()})
    io.write_json(run_dir / "history.json", hist)
    return {"task": task_name, "model": model_name, "seed": seed,
            "sec_per_epoch_median": float(np.median([r["seconds"] for r in hist])),
            "final_loss": hist[-1]["loss"], "history": hist}


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
class EvaluateParams(Params):
    speedup_factor: float = Field(5.0, gt=1, description="claim: latent_sde sec/epoch >= this x ACSSM's")
    n_plot_series: int = Field(3, gt=0, description="test series drawn in the trajectory plots")


def _score(task_name: str, pred, te: dict) -> float:
    from tasks.acssm_fit import accuracy, masked_mse

    if task_name == "classification":
        return accuracy(pred, te["target"], te["target_mask"])
    return masked_mse(pred, te["target"], te["target_mask"])


@stage(PAPER, "evaluate", params=EvaluateParams, inputs=("prepare", "finetune"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import torch

    from tasks.acssm_fit import last_value_baseline, linear_interpolation_baseline, to_tensors

    data_dir, fit_dir = ctx.input("prepare"), ctx.input("finetune")
    runs = io.read_json(fit_dir / "runs.json")
    tasks = sorted({r["task"] for r in runs}, key=TASK_NAMES.index)
    models = sorted({r["model"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    table, curves = {}, {}
    for task_name in tasks:
        te = to_tensors(load_split(data_dir, task_name, "test"))
        row = {}
        for m in models:
            vals = []
            for s in seeds:
                pred = io.load_arrays(fit_dir / task_name / m / f"seed{s}" / "test_predictions.npz")["pred"]
                vals.append(_score(task_name, torch.as_tensor(pred), te))
            row[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}
        if task_name == "interpolation":
            row["linear_interpolation"] = {"mean": _score(task_name, linear_interpolation_baseline(te), te)}
        if task_name in ("extrapolation", "regression"):
            row["last_value"] = {"mean": _score(task_name, last_value_baseline(te), te)}
        if task_name == "classification":
            counts = np.bincount(te["target"].numpy().ravel())
            row["majority_class"] = {"mean": float(counts.max() / counts.sum())}
        table[task_name] = row
        ctx.log_metrics({f"{task_name}/{m}": v["mean"] for m, v in row.items()})
    # speed: median sec/epoch of the same task and seed, latent_sde / acssm
    speed = {}
    by = {(r["task"], r["model"], r["seed"]): r["sec_per_epoch_median"] for r in runs}
    ratios = [by[(t, "latent_sde", s)] / by[(t, "acssm", s)] for t in tasks for s in seeds
              if (t, "latent_sde", s) in by and (t, "acssm", s) in by]
    if ratios:
        speed = {"latent_sde_over_acssm_sec_per_epoch": float(np.mean(ratios)), "min": float(np.min(ratios)),
                 "per_task": {t: float(np.mean([by[(t, "latent_sde", s)] / by[(t, "acssm", s)] for s in seeds]))
                              for t in tasks},
                 "acssm_sec_per_epoch": {t: float(np.mean([by[(t, "acssm", s)] for s in seeds])) for t in tasks},
                 "latent_sde_sec_per_epoch": {t: float(np.mean([by[(t, "latent_sde", s)] for s in seeds]))
                                              for t in tasks}}
    claims = {}

    def beats(task_name, higher_is_better):
        row = table.get(task_name)
        if not row or "acssm" not in row or not {"gru_dt", "latent_sde"} & set(row):
            return None
        a = row["acssm"]["mean"]
        others = [row[b]["mean"] for b in ("gru_dt", "latent_sde") if b in row]
        return bool(all(a > o for o in others) if higher_is_better else all(a < o for o in others))

    for task_name, hib in (("interpolation", False), ("extrapolation", False), ("classification", True),
                           ("regression", False)):
        c = beats(task_name, hib)
        if c is not None:
            claims[f"acssm_beats_baselines_{task_name}"] = c
    if speed:
        claims["simulation_free_speedup"] = bool(speed["latent_sde_over_acssm_sec_per_epoch"] >= p.speedup_factor)

    # plots: trajectories with +-2 std bands, latent mean/variance over time
    for task_name in [t for t in tasks if t != "classification"]:
        te = load_split(data_dir, task_name, "test")
        pr = io.load_arrays(fit_dir / task_name / "acssm" / f"seed{seeds[0]}" / "test_predictions.npz")
        n = min(p.n_plot_series, te["times"].shape[0])
        fig, axes = plt.subplots(n, 2, figsize=(10, 2.4 * n), squeeze=False)
        for i in range(n):
            t = te["times"][i]
            for c in range(min(2, te["target"].shape[-1])):
                ax = axes[i, c]
                mu, sd = pr["pred"][i, :, c], pr["std"][i, :, c]
                ax.fill_between(t, mu - 2 * sd, mu + 2 * sd, alpha=0.25, label="ACSSM +-2 sd")
                ax.plot(t, mu, label="ACSSM mean")
                ax.plot(t, te["target"][i, :, c], "k.", ms=3, label="truth")
                obs = te["mask"][i, :, c] > 0
                ax.plot(t[obs], te["values"][i, obs, c], "rx", ms=4, label="observed input")
                ax.set_title(f"{task_name} series {i} channel {c}", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        ctx.log_figure(fig, f"trajectories_{task_name}.png")
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3))
        t = te["times"][0]
        axes[0].plot(t, pr["latent_mean"][0][:, :4])
        axes[0].set_title(f"{task_name}: latent mean (4 dims), series 0", fontsize=8)
        axes[1].plot(t, pr["latent_var"][0][:, :4])
        axes[1].set_title("latent variance (eigen-coords)", fontsize=8)
        for ax in axes:
            ax.set_xlabel("time")
        fig.tight_layout()
        ctx.log_figure(fig, f"latent_{task_name}.png")
        plt.close(fig)
        curves[task_name] = [{"time": float(a), "variance": float(b)}
                             for a, b in zip(t, pr["latent_var"][0].mean(-1))]
    metrics = {"test": table, "speed": speed, "seeds": seeds,
               "metric": {"classification": "per-time-point accuracy (higher is better)",
                          "regression": "MSE of (sin, cos) (lower is better)",
                          "interpolation": "masked MSE on held-out points, normalised units",
                          "extrapolation": "masked MSE on the future half, normalised units"},
               "claims": claims}
    ctx.write_metrics(metrics)
    for task_name, rows in curves.items():
        io.write_json(ctx.results_file(f"curves/latent_variance_{task_name}.json"), rows)
