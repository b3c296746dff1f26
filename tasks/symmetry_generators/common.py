"""What the symmetry_generators stages share: the data file, its grid, and patch sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.core import io


class DataMeta(BaseModel):
    """``artifacts/symmetry_generators/prepare/meta.json``: the grid behind the scaled points."""

    model_config = ConfigDict(extra="forbid")
    source: str
    length: float
    t_end: float
    u_scale: float
    dx: float
    dt: float
    n_train: int
    n_test: int
    nt: int
    nx: int

    @classmethod
    def read(cls, folder: Path) -> "DataMeta":
        return cls.model_validate(io.read_json(folder / "meta.json"))

    def grid(self):
        from models.symmetry_generators.validity import Grid

        return Grid(self.length, self.t_end, self.u_scale, self.dx, self.dt)


def load_split(folder: Path, split: str, dtype=None):
    """(u (n, nt, nx), times (nt,)) of ``split`` as torch tensors."""
    import torch

    arrays = io.load_arrays(folder / "data.npz")
    dtype = dtype or torch.float64
    return torch.tensor(arrays[f"u_{split}"], dtype=dtype), torch.tensor(arrays["times"], dtype=dtype)


def sample_patches(u, times, grid, size: int, count: int, generator):
    """``count`` random size x size (t x x) patches of random trajectories (x wraps periodically)."""
    import torch

    from models.symmetry_generators.validity import patch_points

    n, nt, nx = u.shape
    traj = torch.randint(0, n, (count,), generator=generator)
    t_idx = torch.randint(0, nt - size + 1, (count,), generator=generator)
    x_idx = torch.randint(0, nx, (count,), generator=generator)
    return patch_points(u[traj], times, grid, t_idx, x_idx, size, size)


def generator_file(seed: int) -> str:
    return f"seed{seed}/generators.safetensors"


def as_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
