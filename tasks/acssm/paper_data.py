"""Paper-scale data for acssm: loaders of the paper's data sets from local files in their published formats.

Expected layout under ``data_dir`` (nothing is downloaded):

    ushcn/small_chunked_sporadic.csv      USHCN daily climate, GRU-ODE-Bayes/CRU preprocessing:
                                          columns ID, Time, Value_0..Value_4, Mask_0..Mask_4
    physionet/set-a/*.txt                 PhysioNet/CinC 2012, one file per ICU stay, lines "HH:MM,Param,Value"
    activity/ConfLongDemo_JSI.txt         UCI "Localization Data for Person Activity": lines
                                          "A01,010-000-024-033,<ticks>,27.05.2009 14:03:25:127,x,y,z,activity"
    pendulum/pendulum.npz                 arrays obs [N,T,H,W(,C)] images (the conv encoder's input) or
                                          [N,T,D] vectors, targets [N,T,2],
                                          times [N,T] (optional; default 0..T-1 * 0.1), obs_valid [N,T]

Each loader returns series in the acssm stage format (see tasks/acssm/data.py).
"""
from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from pathlib import Path

import numpy as np

PHYSIONET_PARAMS = ["Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine",
                    "DiasABP", "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP",
                    "MechVent", "Na", "NIDiasABP", "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets",
                    "RespRate", "SaO2", "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "Weight"]
ACTIVITY_TAGS = ["010-000-024-033", "010-000-030-096", "020-000-033-111", "020-000-032-221"]
ACTIVITY_LABELS = ["walking", "falling", "lying", "lying down", "sitting down", "sitting", "standing up from lying",
                   "on all fours", "sitting on the ground", "standing up from sitting",
                   "standing up from sitting on the ground"]
ACTIVITY_CLASSES = {"walking": 0, "falling": 1, "lying": 2, "lying down": 2, "sitting down": 3, "sitting": 3,
                    "standing up from lying": 4, "standing up from sitting": 4,
                    "standing up from sitting on the ground": 4, "on all fours": 5, "sitting on the ground": 6}


def pad_series(items: list[dict], obs_dim: int, label: bool = False) -> dict:
    """items: dicts with times [k], values [k, D] (NaN = missing) and, if label, labels [k]."""
    if not items:
        raise ValueError("no series found")
    K = max(len(it["times"]) for it in items)
    N = len(items)
    out = {"times": np.zeros((N, K), np.float32), "values": np.full((N, K, obs_dim), np.nan, np.float32),
           "valid": np.zeros((N, K), bool)}
    if label:
        out["target"] = np.zeros((N, K), np.int64)
    for i, it in enumerate(items):
        k = len(it["times"])
        out["times"][i, :k], out["values"][i, :k], out["valid"][i, :k] = it["times"], it["values"], True
        if k < K:                                       # padding keeps times increasing (ignored anyway)
            out["times"][i, k:] = it["times"][-1] + np.arange(1, K - k + 1)
        if label:
            out["target"][i, :k] = it["labels"]
    out["mask"] = (~np.isnan(out["values"]) & out["valid"][..., None]).astype(np.float32)
    if label:
        out["target_mask"] = out["valid"].astype(np.float32)
    else:
        out["target"] = out["values"].copy()
        out["target_mask"] = out["mask"].copy()
    return out


def load_ushcn(path: Path, max_series: int | None = None) -> dict:
    """USHCN daily (5 channels) in the GRU-ODE-Bayes csv format: one row per (station ID, Time)."""
    rows = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows[int(float(r["ID"]))].append(r)
    items = []
    for sid in sorted(rows)[:max_series]:
        rs = sorted(rows[sid], key=lambda r: float(r["Time"]))
        t = np.array([float(r["Time"]) for r in rs])
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"USHCN station {sid}: duplicate or unsorted times")
        v = np.array([[float(r[f"Value_{c}"]) if float(r[f"Mask_{c}"]) > 0 else np.nan for c in range(5)]
                      for r in rs])
        items.append({"times": t, "values": v})
    return pad_series(items, 5)


def _hhmm(s: str) -> float:
    h, m = s.split(":")
    return int(h) + int(m) / 60.0


def load_physionet(folder: Path, max_series: int | None = None) -> dict:
    """PhysioNet 2012 set-a/b text files: 37 time-varying variables, times in hours; the static header
    (RecordID, Age, Gender, Height, ICUType at 00:00) is dropped; repeated measurements are averaged."""
    files = sorted(Path(folder).glob("*.txt"))[:max_series]
    items = []
    index = {p: i for i, p in enumerate(PHYSIONET_PARAMS)}
    for fp in files:
        acc = defaultdict(lambda: defaultdict(list))
        with open(fp) as f:
            header = f.readline().strip().split(",")
            if header != ["Time", "Parameter", "Value"]:
                raise ValueError(f"{fp.name}: expected header Time,Parameter,Value, got {header}")
            for line in f:
                time_s, param, value = line.strip().split(",")
                if param in index and float(value) >= 0:
                    acc[_hhmm(time_s)][param].append(float(value))
        times = sorted(acc)
        if not times:
            continue
        v = np.full((len(times), len(PHYSIONET_PARAMS)), np.nan)
        for k, t in enumerate(times):
            for param, vals in acc[t].items():
                v[k, index[param]] = np.mean(vals)
        items.append({"times": np.array(times), "values": v})
    return pad_series(items, len(PHYSIONET_PARAMS))


def load_activity(path: Path, window: int = 50) -> dict:
    """UCI person activity: 4 tags x (x, y, z) = 12 channels; times in ms since the recording's start
    rounded to 100 ms bins (one bin holds the readings of the tags seen in it); windows of ``window``
    consecutive bins; 7 classes per time point (the grouping used by Rubanova et al. 2019)."""
    recs = defaultdict(list)
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) != 8:
                continue
            seq, tag, _ticks, stamp, x, y, z, act = parts
            if tag not in ACTIVITY_TAGS or act not in ACTIVITY_CLASSES:
                raise ValueError(f"unknown tag or activity in line: {line.strip()}")
            when = dt.datetime.strptime(stamp, "%d.%m.%Y %H:%M:%S:%f")
            recs[seq].append((when, ACTIVITY_TAGS.index(tag), float(x), float(y), float(z), act))
    items = []
    for seq in sorted(recs):
        rs = sorted(recs[seq])
        t0 = rs[0][0]
        bins = defaultdict(lambda: [np.full(12, np.nan), None])
        for when, tag, x, y, z, act in rs:
            b = round((when - t0).total_seconds() * 10)            # 100 ms bins
            bins[b][0][3 * tag:3 * tag + 3] = (x, y, z)
            bins[b][1] = ACTIVITY_CLASSES[act]
        keys = sorted(bins)
        for s in range(0, len(keys) - window + 1, window):
            ks = keys[s:s + window]
            items.append({"times": (np.array(ks) - ks[0]) / 10.0,
                          "values": np.stack([bins[k][0] for k in ks]),
                          "labels": np.array([bins[k][1] for k in ks])})
    return pad_series(items, 12, label=True)


def load_pendulum(path: Path) -> tuple[dict, list[int] | None]:
    """Pendulum npz: obs [N,T,H,W] or [N,T,H,W,C] (channels last, as CRU stores its frames) images, or
    [N,T,D] vectors; targets [N,T,2], optional times and obs_valid. Returns the series with each frame
    flattened channels-first, and the frame shape [C, H, W] (None for vectors) for the conv encoder."""
    with np.load(path) as f:
        raw = f["obs"]
        if raw.ndim == 5:                                   # [N,T,H,W,C] -> [N,T,C,H,W]
            raw = raw.transpose(0, 1, 4, 2, 3)
        elif raw.ndim == 4:                                 # [N,T,H,W] -> one channel
            raw = raw[:, :, None]
        elif raw.ndim != 3:
            raise ValueError(f"pendulum obs must be [N,T,D], [N,T,H,W] or [N,T,H,W,C], got shape {raw.shape}")
        image_shape = [int(v) for v in raw.shape[2:]] if raw.ndim == 5 else None
        obs = raw.reshape(raw.shape[0], raw.shape[1], -1).astype(np.float32)
        if obs.max() > 1.5:
            obs = obs / 255.0
        target = f["targets"].astype(np.float32)
        times = f["times"].astype(np.float32) if "times" in f.files else \
            np.broadcast_to(np.arange(obs.shape[1], dtype=np.float32) * 0.1, obs.shape[:2]).copy()
        mask = np.ones_like(obs)
        if "obs_valid" in f.files:
            mask = np.broadcast_to(f["obs_valid"].reshape(obs.shape[0], obs.shape[1], 1), obs.shape).astype(np.float32)
    N, K = times.shape
    return ({"times": times, "values": np.where(mask > 0, obs, np.nan).astype(np.float32), "mask": mask,
             "target": target, "target_mask": np.ones_like(target), "valid": np.ones((N, K), bool)}, image_shape)


def split(data: dict, seed: int, test_fraction: float = 0.2) -> dict:
    n = data["times"].shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_test < 1:
        raise ValueError(f"need at least 2 series to split, got {n}")
    return {"train": {k: v[perm[n_test:]] for k, v in data.items()},
            "test": {k: v[perm[:n_test]] for k, v in data.items()}}


def hide_for_interpolation(data: dict, seed: int, rate: float = 0.3) -> dict:
    """Hide a random ``rate`` of the observed time points from the input; score on them."""
    rng = np.random.default_rng(seed)
    hidden = (rng.random(data["valid"].shape) < rate) & data["valid"]
    mask = data["mask"] * ~hidden[..., None]
    return {**data, "mask": mask, "values": np.where(mask > 0, data["values"], np.nan),
            "target_mask": data["target_mask"] * hidden[..., None]}


def hide_future(data: dict) -> dict:
    """Extrapolation: observe the first half of each series' time span, score the second half."""
    t, valid = data["times"], data["valid"]
    end = np.where(valid, t, -np.inf).max(1, keepdims=True)
    start = t[:, :1]
    future = (t > (start + end) / 2) & valid
    mask = data["mask"] * ~future[..., None]
    return {**data, "mask": mask, "values": np.where(mask > 0, data["values"], np.nan),
            "target_mask": data["target_mask"] * future[..., None]}


def normalise(splits: dict) -> dict:
    """Per-channel z-score with the training split's observed statistics."""
    v = splits["train"]["values"]
    mu, sd = np.nanmean(v, (0, 1)), np.nanstd(v, (0, 1)) + 1e-6
    mu, sd = np.nan_to_num(mu), np.where(np.isnan(sd), 1.0, sd)
    out = {}
    for name, d in splits.items():
        d = {**d, "values": (d["values"] - mu) / sd}
        if d["target"].dtype.kind == "f" and d["target"].shape == d["values"].shape:
            d["target"] = (d["target"] - mu) / sd
        out[name] = d
    return out


def build_all(data_dir: Path, seed: int) -> tuple[dict, dict]:
    """The four paper tasks from what is present under data_dir, and each task's meta extras (source,
    image_shape); missing data sets are skipped, with a clear error if none is present.
    Interpolation/extrapolation use USHCN (PhysioNet if USHCN is absent)."""
    data_dir = Path(data_dir)
    built, extra = {}, {}
    act = data_dir / "activity" / "ConfLongDemo_JSI.txt"
    if act.exists():
        built["classification"] = split(load_activity(act), seed)
        extra["classification"] = {"source": "UCI person activity"}
    pend = data_dir / "pendulum" / "pendulum.npz"
    if pend.exists():
        series, image_shape = load_pendulum(pend)
        built["regression"] = split(series, seed)
        extra["regression"] = {"source": "pendulum", "image_shape": image_shape}
    ushcn = data_dir / "ushcn" / "small_chunked_sporadic.csv"
    phys = data_dir / "physionet" / "set-a"
    source = load_ushcn(ushcn) if ushcn.exists() else (load_physionet(phys) if phys.exists() else None)
    if source is not None:
        base = normalise(split(source, seed))
        built["interpolation"] = {k: hide_for_interpolation(v, seed + i) for i, (k, v) in enumerate(base.items())}
        built["extrapolation"] = {k: hide_future(v) for k, v in base.items()}
        name = "USHCN" if ushcn.exists() else "PhysioNet 2012"
        extra["interpolation"] = extra["extrapolation"] = {"source": name}
    if not built:
        raise FileNotFoundError(f"no paper data set found under {data_dir} (see tasks/acssm/paper_data.py)")
    return built, extra
