"""Diversity and mixing of posterior samples: disagreement, loss barriers and mode count, ESS, R-hat.

(Accuracy, NLL and ECE of the model average are the project's shared metrics, applied by the stages.)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def disagreement(probs: np.ndarray) -> float:
    """Mean over sample pairs of the fraction of inputs whose argmax predictions differ ([K, n, C])."""
    pred = np.asarray(probs).argmax(-1)
    k = pred.shape[0]
    pairs = [(pred[i] != pred[j]).mean() for i in range(k) for j in range(i + 1, k)]
    return float(np.mean(pairs)) if pairs else 0.0


def path_losses(samples: torch.Tensor, loss_of_rows: Callable[[torch.Tensor], torch.Tensor],
                points: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Loss at ``points`` evenly spaced points of the straight line between every pair of samples
    ([K, D]); returns the pairs and the losses [pairs, points] (all paths as one batch of rows)."""
    k = samples.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    t = torch.linspace(0, 1, points, dtype=samples.dtype, device=samples.device).view(1, -1, 1)
    a = samples[[i for i, _ in pairs]].unsqueeze(1)
    b = samples[[j for _, j in pairs]].unsqueeze(1)
    rows = ((1 - t) * a + t * b).reshape(-1, samples.shape[1])
    return pairs, loss_of_rows(rows).reshape(len(pairs), points)


def barriers(losses: torch.Tensor) -> torch.Tensor:
    """Max loss along each path above the mean of its two endpoints' losses."""
    return losses.max(1).values - (losses[:, 0] + losses[:, -1]) / 2


def mode_count(samples: torch.Tensor, loss_of_rows: Callable[[torch.Tensor], torch.Tensor], points: int,
               delta: float) -> tuple[int, np.ndarray]:
    """Samples share a mode when the barrier on their straight path is below ``delta``; the modes are the
    connected groups of that relation. Returns (count, barrier matrix [K, K])."""
    k = samples.shape[0]
    pairs, losses = path_losses(samples, loss_of_rows, points)
    bar = barriers(losses).cpu().numpy()
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    matrix = np.zeros((k, k))
    for (i, j), value in zip(pairs, bar):
        matrix[i, j] = matrix[j, i] = value
        if value < delta:
            parent[root(i)] = root(j)
    return len({root(i) for i in range(k)}), matrix


def rhat(chains: np.ndarray) -> np.ndarray:
    """Gelman-Rubin potential scale reduction of [chains, draws, ...] scalars."""
    x = np.asarray(chains, dtype=np.float64)
    m, n = x.shape[:2]
    means = x.mean(1)
    between = n * means.var(0, ddof=1)
    within = x.var(1, ddof=1).mean(0)
    var_plus = (n - 1) / n * within + between / n
    return np.sqrt(var_plus / np.maximum(within, 1e-300))


def ess(chains: np.ndarray) -> np.ndarray:
    """Effective sample size of [chains, draws, ...] scalars: the chains' pooled autocorrelation summed
    over Geyer's initial positive sequence of lag pairs (as in Stan)."""
    x = np.asarray(chains, dtype=np.float64)
    m, n = x.shape[:2]
    centred = x - x.mean(1, keepdims=True)
    within = x.var(1, ddof=1).mean(0)
    var_plus = (n - 1) / n * within + (x.mean(1).var(0, ddof=1) if m > 1 else 0.0)
    rho = [np.ones(x.shape[2:])]
    for lag in range(1, n):
        acov = (centred[:, lag:] * centred[:, :-lag]).mean(1) * (n - lag) / n  # [m, ...]
        rho.append(1 - (within - acov.mean(0)) / np.maximum(var_plus, 1e-300))
    rho = np.stack(rho)                                 # [n, ...]
    tau = -np.ones(x.shape[2:])
    alive = np.ones(x.shape[2:], dtype=bool)
    for t in range(0, n - 1, 2):
        pair = rho[t] + rho[t + 1]
        alive &= pair > 0
        tau += 2 * np.where(alive, pair, 0.0)
    return m * n / np.maximum(tau, 1e-12)
