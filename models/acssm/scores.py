"""A split as tensors, the scores of the acssm tasks and their trivial references (no model code)."""
from __future__ import annotations

import numpy as np
import torch

FIELDS = ("times", "values", "mask", "target", "target_mask", "valid")


def to_tensors(data: dict, device="cpu") -> dict:
    """The arrays of a split (see tasks/acssm/data.py) as tensors: valid bool, labels long, the rest float32."""
    out = {}
    for k in FIELDS:
        a = np.asarray(data[k])
        dtype = torch.bool if k == "valid" else (torch.long if a.dtype.kind == "i" else torch.float32)
        out[k] = torch.as_tensor(a, dtype=dtype, device=device)
    return out


def masked_mse(pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor) -> float:
    err = (torch.nan_to_num(pred) - torch.nan_to_num(target)) ** 2 * target_mask
    return float(err.sum() / target_mask.sum().clamp(min=1))


def accuracy(probs: torch.Tensor, labels: torch.Tensor, target_mask: torch.Tensor) -> float:
    hit = (probs.argmax(-1) == labels).float() * target_mask
    return float(hit.sum() / target_mask.sum().clamp(min=1))


def linear_interpolation_baseline(data: dict) -> torch.Tensor:
    """Per channel, linear interpolation in time of the observed inputs (constant beyond the ends)."""
    t, v, m = (data[k].numpy() for k in ("times", "values", "mask"))
    out = np.zeros_like(np.nan_to_num(data["target"].numpy()))
    for i in range(t.shape[0]):
        for c in range(v.shape[-1]):
            obs = m[i, :, c] > 0
            if obs.any():
                out[i, :, c] = np.interp(t[i], t[i][obs], v[i, obs, c])
    return torch.as_tensor(out)


def last_value_baseline(data: dict) -> torch.Tensor:
    """Per channel, the last observed input value carried forward (the first one carried back)."""
    t, v, m = (data[k].numpy() for k in ("times", "values", "mask"))
    out = np.zeros_like(np.nan_to_num(data["target"].numpy()))
    for i in range(t.shape[0]):
        for c in range(v.shape[-1]):
            obs = np.nonzero(m[i, :, c] > 0)[0]
            if len(obs):
                j = np.clip(np.searchsorted(obs, np.arange(t.shape[1]), side="right") - 1, 0, None)
                out[i, :, c] = v[i, obs[j], c]
    return torch.as_tensor(out)
