"""Evaluation metrics shared by the papers (numpy in, floats out)."""
from __future__ import annotations

import numpy as np
from scipy import linalg

EPS = 1e-12


def mean_std(values) -> dict[str, float]:
    """The project's summary of a metric over seeds: mean and sample standard deviation (ddof=1;
    0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, EPS, 1.0)).mean())


def error(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(-1) != labels).mean())


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins: sum_b |B_b|/N |acc_b - conf_b|."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def ambiguity(member_probs: np.ndarray, labels: np.ndarray) -> float:
    """Ensemble ambiguity (Wood et al. 2023): mean member NLL - NLL of the averaged prediction (>= 0)."""
    member_probs = np.asarray(member_probs)
    members = np.mean([nll(p, labels) for p in member_probs])
    return float(members - nll(member_probs.mean(0), labels))


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    from sklearn.metrics import f1_score

    classes = None if num_classes is None else list(range(num_classes))
    return float(f1_score(labels, pred, average="macro", labels=classes, zero_division=0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.cov(feats_a, rowvar=False)
    cov_b = np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
