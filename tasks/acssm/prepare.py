"""acssm prepare: the four irregular time-series tasks as split files plus meta.json."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.acssm import data as series
from tasks.acssm.common import TaskMeta, split_file
from tasks.core import Params, StageContext, io, stage


class PrepareParams(Params):
    source: Literal["synthetic", "paper"] = Field(description="synthetic + statsmodels (CPU) or the paper's data "
                                                  "sets from local files (paper scale)")
    data_dir: str = Field(description="paper scale: folder with the published files (see docs/acssm.md)")
    n_train: int = Field(gt=0, description="training series for the synthetic tasks")
    n_test: int = Field(gt=0, description="test series for the synthetic tasks")
    classification_points: int = Field(ge=4, description="grid points of a regime-switching series")
    classification_keep: int = Field(ge=2, description="time points kept per series")
    pendulum_points: int = Field(ge=4, description="grid points of a pendulum series (dt 0.05)")
    pendulum_keep: int = Field(ge=2, description="time points kept per series")
    missing: float = Field(ge=0, lt=1, description="per-channel missingness of the inputs")
    real_window: int = Field(ge=8, description="months per window of the real series")
    real_stride: int = Field(gt=0, description="months between window starts")
    real_draws: int = Field(gt=0, description="irregular subsamplings per window")
    real_keep: float = Field(gt=0, le=1, description="fraction of months kept per draw")
    impute_rate: float = Field(gt=0, lt=1, description="interpolation: fraction of kept points hidden")


def synthetic_tasks(p: PrepareParams, seed: int) -> tuple[dict, dict]:
    """Regime-switching classification, pendulum regression (train and test from different seeds)
    and the real co2 + elnino windows for interpolation and extrapolation; (splits, extra meta)."""
    sets = {
        "classification": lambda n, s: series.regime_switching(
            n, s, p.classification_points, p.classification_keep, missing=p.missing),
        "regression": lambda n, s: series.pendulum(n, s, p.pendulum_points, p.pendulum_keep, missing=p.missing),
    }
    built = {name: {"train": fn(p.n_train, seed * 10 + 1), "test": fn(p.n_test, seed * 10 + 2)}
             for name, fn in sets.items()}
    extra = {"classification": {"source": "synthetic regime-switching system"},
             "regression": {"source": "synthetic pendulum"}}
    raw, channels = series.co2_elnino_monthly()
    for mode in ("interpolation", "extrapolation"):
        kw = dict(mode=mode, window=p.real_window, stride=p.real_stride, draws=p.real_draws,
                  keep=p.real_keep, missing=p.missing, impute_rate=p.impute_rate)
        train = series.real_windows(raw, seed, "train", **kw)
        test = series.real_windows(raw, seed, "test", **kw)
        scale = series.centred_scale(train)
        built[mode] = {"train": series.scale_channels(train, scale), "test": series.scale_channels(test, scale)}
        extra[mode] = {"channels": channels, "scale": scale.tolist(), "source": "statsmodels co2 + elnino"}
    return built, extra


def task_meta(name: str, splits: dict[str, dict[str, np.ndarray]], extra: dict) -> TaskMeta:
    train = splits["train"]
    classification = name == "classification"
    return TaskMeta(task="classification" if classification else "regression",
                    obs_dim=int(train["values"].shape[-1]),
                    out_dim=int(train["target"].max()) + 1 if classification else int(train["target"].shape[-1]),
                    n_train=int(train["times"].shape[0]), n_test=int(splits["test"]["times"].shape[0]),
                    points=int(splits["test"]["times"].shape[1]), source=extra.get("source", ""),
                    channels=extra.get("channels"), scale=extra.get("scale"), image_shape=extra.get("image_shape"))


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Build the classification, regression, interpolation and extrapolation splits."""
    if p.classification_keep > p.classification_points or p.pendulum_keep > p.pendulum_points:
        raise ValueError("acssm.prepare: *_keep must not exceed *_points")
    if p.source == "paper":
        from tasks.acssm import paper_data

        built, extra = paper_data.build_all(Path(p.data_dir), ctx.seed)
    else:
        built, extra = synthetic_tasks(p, ctx.seed)
    meta = {}
    for name, splits in built.items():
        for split, arrays in splits.items():
            io.save_arrays(split_file(ctx.out_dir, name, split), **arrays)
        meta[name] = task_meta(name, splits, extra[name]).model_dump()
    io.write_json(ctx.out_dir / "meta.json", meta)
