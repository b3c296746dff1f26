"""Offline irregular time-series builders for acssm (CPU scale); the paper's data sets are in paper_data.py.

Every builder returns a dict of numpy arrays for one split, the shared format of the acssm stages:
    times [N, K] float (strictly increasing), values [N, K, D] (NaN where not observed),
    mask [N, K, D] (1 = observed input), target [N, K, C] float or [N, K] int labels,
    target_mask [N, K, C] or [N, K] (1 = scored), valid [N, K] bool (padding at the end).
"""
from __future__ import annotations

import numpy as np


def _subsample(rng, n_points: int, keep: int) -> np.ndarray:
    return np.sort(rng.choice(n_points, size=keep, replace=False))


def _channel_mask(rng, shape, missing: float) -> np.ndarray:
    """Per-channel missingness, but never a time point with no channel observed."""
    mask = (rng.random(shape) >= missing).astype(np.float32)
    empty = mask.sum(-1) == 0
    idx = np.nonzero(empty)
    mask[idx + (rng.integers(0, shape[-1], size=len(idx[0])),)] = 1.0
    return mask


# --------------------------------------------------------------------------------------------------
# 1. Per-time-point classification: regime-switching dynamical system (Human Activity analogue)
# --------------------------------------------------------------------------------------------------
def regime_switching(n: int, seed: int, n_points: int = 50, keep: int = 25, obs_dim: int = 12,
                     n_regimes: int = 7, stay: float = 0.93, speed: float = 1.5, obs_noise: float = 0.3,
                     missing: float = 0.2, mean_gap: float = 0.1) -> dict:
    """A 2-d latent position moves with the velocity of its hidden Markov regime (7 directions); it is
    seen through a fixed random 12x2 linear map plus noise on a grid of ``n_points`` steps of ``mean_gap``
    (like the 100 ms bins of Human Activity), of which a random ``keep`` are kept; the label of each kept
    time point is its regime. Only motion identifies the regime, so a model must use the dynamics.
    """
    rng = np.random.default_rng(seed)
    emit = np.random.default_rng(12345).normal(size=(2, obs_dim)) / np.sqrt(2)   # shared across splits
    angles = 2 * np.pi * np.arange(n_regimes) / n_regimes
    vel = speed * np.stack([np.cos(angles), np.sin(angles)], 1)
    times = np.zeros((n, keep), np.float32)
    values = np.zeros((n, keep, obs_dim), np.float32)
    labels = np.zeros((n, keep), np.int64)
    for i in range(n):
        t = np.arange(1, n_points + 1) * mean_gap
        regime = np.empty(n_points, np.int64)
        regime[0] = rng.integers(n_regimes)
        for k in range(1, n_points):
            regime[k] = regime[k - 1] if rng.random() < stay else rng.integers(n_regimes)
        gaps = np.diff(t, prepend=0.0)
        steps = vel[regime] * gaps[:, None] + 0.1 * np.sqrt(gaps)[:, None] * rng.normal(size=(n_points, 2))
        pos = np.cumsum(steps, 0) + rng.normal(size=2)
        obs = pos @ emit + obs_noise * rng.normal(size=(n_points, obs_dim))
        idx = _subsample(rng, n_points, keep)
        times[i], values[i], labels[i] = t[idx], obs[idx], regime[idx]
    mask = _channel_mask(rng, values.shape, missing)
    values = np.where(mask > 0, values, np.nan).astype(np.float32)
    return {"times": times, "values": values, "mask": mask, "target": labels,
            "target_mask": np.ones((n, keep), np.float32), "valid": np.ones((n, keep), bool)}


# --------------------------------------------------------------------------------------------------
# 2. Regression: pendulum angle from irregular, noisy, partly missing observations (Pendulum analogue)
# --------------------------------------------------------------------------------------------------
def pendulum(n: int, seed: int, n_points: int = 100, keep: int = 50, dt: float = 0.05,
             friction: float = 0.1, transition_noise: float = 0.1, obs_noise: float = 0.35,
             noise_corr: float = 0.8, missing: float = 0.3) -> dict:
    """Damped, noise-driven pendulum theta'' = -(g/l) sin theta - friction theta' + noise (g/l = 9.81),
    integrated with 10 sub-steps per grid step. Inputs: (sin, cos) of the angle with AR(1) temporally
    correlated noise, per-channel missingness, half of the time points kept. Target: the clean (sin, cos)
    at every kept time point.
    """
    rng = np.random.default_rng(seed)
    sub = 10
    h = dt / sub
    theta = rng.uniform(-np.pi, np.pi, n)
    omega = rng.normal(0, 2.0, n)
    angle = np.zeros((n, n_points))
    for k in range(n_points):
        angle[:, k] = theta
        for _ in range(sub):
            acc = -9.81 * np.sin(theta) - friction * omega
            omega = omega + h * acc + np.sqrt(h) * transition_noise * rng.normal(size=n)
            theta = theta + h * omega
    clean = np.stack([np.sin(angle), np.cos(angle)], -1)
    noise = np.zeros_like(clean)
    eps = rng.normal(size=clean.shape)
    for k in range(n_points):
        prev = noise[:, k - 1] if k else 0.0
        noise[:, k] = noise_corr * prev + np.sqrt(1 - noise_corr ** 2) * eps[:, k]
    obs = clean + obs_noise * noise
    idx = np.stack([_subsample(rng, n_points, keep) for _ in range(n)])
    take = lambda a: np.take_along_axis(a, idx[..., None], 1)   # noqa: E731
    times = (idx * dt).astype(np.float32)
    values, target = take(obs).astype(np.float32), take(clean).astype(np.float32)
    mask = _channel_mask(rng, values.shape, missing)
    values = np.where(mask > 0, values, np.nan).astype(np.float32)
    return {"times": times, "values": values, "mask": mask, "target": target,
            "target_mask": np.ones_like(target), "valid": np.ones((n, keep), bool)}


# --------------------------------------------------------------------------------------------------
# 3. Interpolation / extrapolation on a real series shipped with statsmodels
# --------------------------------------------------------------------------------------------------
def co2_elnino_monthly() -> tuple[np.ndarray, list[str]]:
    """Monthly 2-channel real series 1958-03..2001-12 from two data sets bundled with statsmodels:
    Mauna Loa CO2 (weekly, averaged per month; NaN where a month has no reading) and the El Nino
    sea-surface temperature (monthly). Returns [T, 2] float (NaN = missing) and the channel names."""
    import pandas as pd
    from statsmodels.datasets import co2, elnino

    c = co2.load_pandas().data["co2"]
    c_month = c.groupby([c.index.year, c.index.month]).mean()
    e = elnino.load_pandas().data
    rows = []
    for _, r in e.iterrows():
        for m, name in enumerate(e.columns[1:], start=1):
            rows.append(((int(r["YEAR"]), m), float(r[name])))
    e_month = pd.Series(dict(rows))
    keys = [k for k in e_month.index if (1958, 3) <= k <= (2001, 12)]
    arr = np.array([[c_month.get(k, np.nan), e_month[k]] for k in keys], np.float64)
    return arr, ["co2_ppm", "elnino_sst_c"]


def real_windows(series: np.ndarray, seed: int, split: str, mode: str, window: int = 48, stride: int = 4,
                 draws: int = 6, keep: float = 0.5, missing: float = 0.2, impute_rate: float = 0.3,
                 train_fraction: float = 0.7) -> dict:
    """Irregular windows of a real multivariate series, split by date (train before test, no overlap).

    Each window of ``window`` months is drawn ``draws`` times: a random ``keep`` fraction of the months is
    kept (times in years from the window start) and each channel is dropped with prob. ``missing``.
    mode "interpolation": a random ``impute_rate`` of the kept points is hidden and scored.
    mode "extrapolation": the first half is input, the kept points of the second half are scored.
    Values are centred per window and channel on the mean of the *input* points (no target leak), and
    scaled by the training split's per-channel standard deviation of those centred values.
    """
    if mode not in ("interpolation", "extrapolation"):
        raise ValueError(f"mode must be interpolation or extrapolation, got {mode!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    T, D = series.shape
    cut = int(train_fraction * T)
    starts = np.arange(0, cut - window + 1, stride) if split == "train" else \
        np.arange(cut, T - window + 1, stride)
    rng = np.random.default_rng(seed + (0 if split == "train" else 7919))
    n_keep = int(round(keep * window))
    out = {k: [] for k in ("times", "values", "mask", "target", "target_mask")}
    for s in starts:
        win = series[s:s + window]
        for _ in range(draws):
            idx = _subsample(rng, window, n_keep)
            vals = win[idx]
            present = ~np.isnan(vals)
            mask = _channel_mask(rng, vals.shape, missing) * present
            if mode == "interpolation":
                hidden = rng.random(n_keep) < impute_rate
            else:
                hidden = idx >= window // 2
            inp = mask * (~hidden[:, None])
            tgt_mask = present * hidden[:, None]
            if inp.sum(0).min() == 0:          # a channel without any input point: skip this draw
                continue
            offset = np.nansum(np.where(inp > 0, vals, 0), 0) / inp.sum(0)
            centred = vals - offset
            out["times"].append(idx / 12.0)
            out["values"].append(np.where(inp > 0, centred, np.nan))
            out["mask"].append(inp)
            out["target"].append(np.where(present, centred, np.nan))
            out["target_mask"].append(tgt_mask)
    res = {k: np.asarray(v, np.float32) for k, v in out.items()}
    res["valid"] = np.ones(res["times"].shape, bool)
    return res


def scale_channels(data: dict, scale: np.ndarray) -> dict:
    """Divide values and targets by a per-channel scale (the training split's)."""
    return {**data, "values": data["values"] / scale, "target": data["target"] / scale}


def centred_scale(data: dict) -> np.ndarray:
    """Per-channel std of the centred training values (inputs and targets)."""
    both = np.concatenate([data["values"].reshape(-1, data["values"].shape[-1]),
                           data["target"].reshape(-1, data["target"].shape[-1])])
    return np.nanstd(both, 0).astype(np.float32)
