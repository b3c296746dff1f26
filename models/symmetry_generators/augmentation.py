"""Lie point symmetry data augmentation (LPSDA, Brandstetter et al. 2022) with known or learned fields.

A trajectory u (nt, nx) is a set of graph points p = (X, T, U) (scaled as in ``validity``). A copy moves
every point by the flow of the combined field sum_j alpha_j V_j, alpha_j ~ U(-1, 1) sigma_j, over
s in [0, 1] (fixed-step RK4), then resamples the moved points back onto the regular grid:

1. in t, linearly along each column of the original grid (the moved times of a column must increase);
   a target frame outside a column's moved time range is not supported;
2. in x, with the periodic band-limited (Dirichlet) kernel of the nx-point grid,
   u(x_m) = sum_j u_j D(x_m - x_j),  D(y) = sin(pi nx y / L) / (nx tan(pi y / L))  (nx even),
   exact for a uniform shift (x-translation, the Galilean boost at fixed t).

Frames supported by every column form the copy's valid rows; a copy with fewer than ``min_rows`` valid
rows is rejected (the original is used instead), as in LPSDA.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .validity import Field, Grid, patch_points, rk4_flow

FieldMaker = Callable[[torch.Tensor], Field]  # coefficients alpha (k,) -> the field sum_j alpha_j V_j


def trajectory_points(u: torch.Tensor, times: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Scaled graph points of whole trajectories: u (n, nt, nx) -> (n, nt, nx, 3), on u's device."""
    zeros = torch.zeros(u.shape[0], dtype=torch.long)
    return patch_points(u.cpu(), times.cpu(), grid, zeros, zeros, u.shape[1], u.shape[2]).to(u.device)


def dirichlet_kernel(y: torch.Tensor, nx: int, length: float) -> torch.Tensor:
    """The periodic interpolation kernel of an nx-point grid (nx even), D(0) = 1, D(m dx) = 0."""
    angle = math.pi * y / length
    near = angle.sin().abs() < 1e-9
    safe = torch.where(near, torch.ones_like(angle), angle)
    value = torch.sin(nx * safe) / (nx * torch.tan(safe))
    return torch.where(near, torch.cos(nx * angle), value)  # the limit at y = 0 (mod L) is +-1


def resample(moved: torch.Tensor, times: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Moved points (nt, nx, 3) of one trajectory -> (u on the grid (nt, nx), valid rows (nt,))."""
    nt, nx, _ = moved.shape
    x = moved[..., 0] * grid.length
    t = moved[..., 1] * grid.t_end
    u = moved[..., 2] / grid.u_scale
    # 1. in t, column by column
    columns_t = t.T.contiguous()                                   # (nx, nt), increasing when valid
    increasing = (columns_t[:, 1:] > columns_t[:, :-1]).all(dim=1)  # (nx,)
    target = times.to(t)[None, :].expand(nx, nt).contiguous()
    lo = (torch.searchsorted(columns_t, target) - 1).clamp(0, nt - 2)
    t0, t1 = columns_t.gather(1, lo), columns_t.gather(1, lo + 1)
    w = (target - t0) / (t1 - t0)
    inside = (w >= -1e-6) & (w <= 1 + 1e-6) & increasing[:, None]   # (nx, nt)
    interp = lambda v: (v.T.gather(1, lo) * (1 - w) + v.T.gather(1, lo + 1) * w).T  # (nt, nx)
    x_k, u_k = interp(x), interp(u)
    # 2. in x, row by row, with the periodic band-limited kernel
    grid_x = torch.arange(nx, dtype=x.dtype, device=x.device) * grid.dx
    kernel = dirichlet_kernel(grid_x[None, :, None] - x_k[:, None, :], nx, grid.length)  # (nt, m, j)
    u_grid = torch.einsum("kmj,kj->km", kernel, u_k)
    return u_grid, inside.all(dim=0)


@torch.no_grad()
def lps_copies(u: torch.Tensor, times: torch.Tensor, grid: Grid, make_field: FieldMaker,
               sigmas: torch.Tensor, n_copies: int, rk4_steps: int, generator: torch.Generator,
               min_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``n_copies`` transformed copies of each trajectory of u (n, nt, nx).

    Returns (copies (n, n_copies, nt, nx) on u's device, valid rows (n, n_copies, nt) on the CPU, number
    rejected). Coefficients are drawn on the CPU ``generator``."""
    n, nt, nx = u.shape
    points = trajectory_points(u, times, grid)
    copies = u[:, None].repeat(1, n_copies, 1, 1)
    valid = torch.ones(n, n_copies, nt, dtype=torch.bool)
    rejected = 0
    for i in range(n):
        for c in range(n_copies):
            alpha = (2 * torch.rand(len(sigmas), generator=generator, dtype=u.dtype) - 1) * sigmas.cpu()
            alpha = alpha.to(u.device)
            moved = rk4_flow(make_field(alpha), points[i].reshape(-1, 3), 1.0, rk4_steps)
            new_u, rows = resample(moved.reshape(nt, nx, 3), times, grid)
            if int(rows.sum()) < min_rows or not torch.isfinite(new_u[rows]).all():
                rejected += 1
                continue
            copies[i, c], valid[i, c] = new_u, rows.cpu()
    return copies, valid, rejected


def linear_combination(fields: list[Field]) -> FieldMaker:
    """alpha -> sum_j alpha_j V_j for fixed fields (e.g. the orthonormalised known symmetries)."""
    return lambda alpha: (lambda p: sum(a * f(p) for a, f in zip(alpha, fields)))
