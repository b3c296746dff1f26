"""Data of the function_space_bridges experiments, generated in code: GP sample paths, Gaussian-mixture
density functions, the two digit domains, El Nino anomalies (statsmodels)."""
from __future__ import annotations

import numpy as np


def cell_centres(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n


def gp_samples(count: int, n: int, lengthscale: float, rng: np.random.Generator) -> np.ndarray:
    """Paths of GP(0, RBF(lengthscale)) at n cell centres of [0, 1] (eigen square root: stable at any n)."""
    x = cell_centres(n)
    cov = np.exp(-0.5 * (x[:, None] - x[None]) ** 2 / lengthscale ** 2)
    vals, vecs = np.linalg.eigh(cov)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    return (rng.standard_normal((count, n)) @ root.T).astype(np.float32)


def mixture_parameters(count: int, components: tuple[int, int], means: tuple[float, float],
                       stds: tuple[float, float], rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(count):
        k = int(rng.integers(components[0], components[1] + 1))
        out.append({"weights": rng.dirichlet(np.ones(k)), "means": rng.uniform(*means, size=k),
                    "stds": rng.uniform(*stds, size=k)})
    return out


def mixture_densities(params: list[dict], n: int) -> np.ndarray:
    """Gaussian-mixture densities on n cell centres, normalised so that the grid integral is 1."""
    x = cell_centres(n)
    out = np.empty((len(params), n))
    for i, p in enumerate(params):
        z = (x[:, None] - p["means"][None]) / p["stds"][None]
        out[i] = (p["weights"][None] * np.exp(-0.5 * z ** 2) / (p["stds"][None] * np.sqrt(2 * np.pi))).sum(-1)
    return (out / out.mean(-1, keepdims=True)).astype(np.float32)


def area_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """[..., S, S] -> [..., size, size] by block means (S divisible by size)."""
    s = images.shape[-1]
    f = s // size
    return images.reshape(*images.shape[:-2], size, f, size, f).mean(axis=(-3, -1))


def elnino_anomalies() -> np.ndarray:
    """Monthly sea-surface temperatures (61 years x 12 months) minus each month's mean, over one global
    standard deviation: one function on a 12-point grid per year."""
    import statsmodels.api as sm

    data = sm.datasets.elnino.load_pandas().data
    sst = data.drop(columns=["YEAR"]).to_numpy(dtype=np.float64)
    anomalies = sst - sst.mean(0, keepdims=True)
    return (anomalies / anomalies.std()).astype(np.float32)
