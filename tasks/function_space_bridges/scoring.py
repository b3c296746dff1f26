"""Scores of the function_space_bridges evaluation: MMD between function sets in L2, density validity,
FD-proxy and domain accuracy of transported images, and the SOC posterior against the exact one."""
from __future__ import annotations

import numpy as np
import torch


def l2_sq_distances(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||f_i - g_j||^2 in L2([0, 1]) (grid mean of squares: the same scale on every grid)."""
    f, g = f.double(), g.double()
    d = (f ** 2).mean(-1)[:, None] + (g ** 2).mean(-1)[None] - 2 * f @ g.T / f.shape[-1]
    return d.clamp_min(0.0)


def median_bandwidth(f: torch.Tensor) -> float:
    """Median heuristic: the median pairwise L2 distance of a reference set."""
    d = l2_sq_distances(f, f)
    return float(d[torch.triu_indices(len(f), len(f), 1).unbind()].median().sqrt())


def mmd2(f: torch.Tensor, g: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 with the kernel exp(-||f - g||^2 / (2 bandwidth^2)) on L2 functions."""
    k = lambda a, b: torch.exp(-l2_sq_distances(a, b) / (2 * bandwidth ** 2))
    kff, kgg, kfg = k(f, f), k(g, g), k(f, g)
    n, m = len(f), len(g)
    off = lambda kk, size: (kk.sum() - kk.diagonal().sum()) / (size * (size - 1))
    return float(off(kff, n) + off(kgg, m) - 2 * kfg.mean())


def density_validity(f: torch.Tensor) -> dict[str, float]:
    """Mean |integral - 1| and the fraction of negative mass (integral of f^- over integral of |f|)."""
    f = f.double()
    integral = f.mean(-1)
    negative = (-f).clamp_min(0).mean(-1) / f.abs().mean(-1).clamp_min(1e-12)
    return {"mass_error": float((integral - 1).abs().mean()), "negative_mass": float(negative.mean())}


def image_scores(clf, images: torch.Tensor, reference_feats: np.ndarray, b_classes: list[int]) -> dict:
    """FD-proxy against the reference features and the fraction classified into domain B."""
    from tasks.data.digit_features import classifier_features
    from tasks.metrics import frechet_distance

    feats, pred = classifier_features(clf, images.float().to(next(clf.parameters()).device))
    in_b = np.isin(pred.cpu().numpy(), b_classes)
    return {"fd": frechet_distance(feats.cpu().numpy().astype(np.float64), reference_feats),
            "domain_accuracy": float(in_b.mean())}


def posterior_errors(sample_mean, sample_std, exact_mean, exact_var, prior_std) -> dict[str, float]:
    """RMS over the grid of the mean and std errors, in units of the prior's RMS standard deviation."""
    scale = float(prior_std.pow(2).mean().sqrt())
    rms = lambda x: float(x.pow(2).mean(-1).sqrt().mean())
    return {"mean_error": rms(sample_mean - exact_mean) / scale,
            "std_error": rms(sample_std - exact_var.sqrt()) / scale}


def gaussian_log_lik(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * np.pi * var) + (y - mean) ** 2 / var)
