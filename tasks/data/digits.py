"""scikit-learn's digits (1797 8x8 images shipped in the package): stratified splits, upsampling."""
from __future__ import annotations

import numpy as np


def load_digits_array(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images in [0, 1] as float32 [N, size, size] and labels int64 [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    if size != 8:
        import torch
        import torch.nn.functional as F

        x = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                          align_corners=False)[:, 0].numpy()
    return x, d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Index arrays per split; the split without a fraction ('train') takes the rest."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    out: dict[str, np.ndarray] = {}
    rest = idx
    remaining = 1.0
    for name, frac in fractions.items():
        take = frac / remaining
        rest, part = train_test_split(rest, test_size=take, stratify=labels[rest], random_state=seed)
        out[name] = np.sort(part)
        remaining -= frac
    out["train"] = np.sort(rest)
    return out
