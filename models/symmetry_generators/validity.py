"""The PDE validity score of a vector field on the solution graph (x, t, u) (the paper's Sec. 3-4).

Points are kept in scaled coordinates p = (X, T, U) = (x / L, t / t_end, c_u u). A field V moves every
point of a patch by the one-parameter flow dp/ds = V(p) (fixed-step RK4). The moved points keep the
grid's connectivity, so at each interior point a polynomial in (dx, dt) fitted by least squares to its
5 x 5 moved neighbours gives u, u_x, u_xxx, u_t there; the score is the mean of
log max(|u_t + u u_x + u_xxx|, th) over the patch (lower = the moved points are closer to a solution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Field = Callable[[torch.Tensor], torch.Tensor]  # (..., 3) -> (..., 3)

# monomials dx^a dt^b of the local fit: a <= 4 with b <= 1, plus dt^2 and dx dt^2
MONOMIALS = [(a, b) for b in (0, 1) for a in range(5)] + [(0, 2), (1, 2)]


@dataclass(frozen=True)
class Grid:
    """Physical sizes that map scaled points back to (x, t, u)."""

    length: float      # L of the periodic x domain
    t_end: float       # t scale: T = t / t_end
    u_scale: float     # U = u_scale * u
    dx: float          # grid spacing in x
    dt: float          # frame spacing in t


def rk4_flow(field: Field, points: torch.Tensor, s: float | torch.Tensor, steps: int) -> torch.Tensor:
    """Phi^s(points): ``steps`` RK4 steps of dp/ds = V(p) from 0 to s (s may be negative)."""
    h = s / steps
    p = points
    for _ in range(steps):
        k1 = field(p)
        k2 = field(p + h / 2 * k1)
        k3 = field(p + h / 2 * k2)
        k4 = field(p + h * k3)
        p = p + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return p


def patch_points(u: torch.Tensor, times: torch.Tensor, grid: Grid, t_idx: torch.Tensor,
                 x_idx: torch.Tensor, size_t: int, size_x: int) -> torch.Tensor:
    """Scaled graph points of patches: u (n_traj, nt, nx) -> (n_patch, size_t, size_x, 3).

    Patch j starts at frame t_idx[j] and column x_idx[j] of trajectory j (x wraps periodically)."""
    nx = u.shape[-1]
    rows = t_idx[:, None] + torch.arange(size_t)[None, :]                       # (n, st)
    cols = (x_idx[:, None] + torch.arange(size_x)[None, :]) % nx                # (n, sx)
    values = u[torch.arange(u.shape[0])[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = (x_idx[:, None] + torch.arange(size_x)[None, :]).to(u.dtype) * grid.dx  # unwrapped x
    big_t = (times[rows] / grid.t_end)[:, :, None].expand_as(values)
    big_x = (x / grid.length)[:, None, :].expand_as(values)
    return torch.stack([big_x, big_t, grid.u_scale * values], dim=-1)


def neighbourhoods(points: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(n, st, sx, 3) -> (n, st - 2r, sx - 2r, (2r+1)^2, 3): each interior point's moved neighbours."""
    n, st, sx, _ = points.shape
    shifts = [points[:, r0:st - 2 * radius + r0, c0:sx - 2 * radius + c0]
              for r0 in range(2 * radius + 1) for c0 in range(2 * radius + 1)]
    return torch.stack(shifts, dim=3)


def local_derivatives(points: torch.Tensor, grid: Grid, ridge: float = 1e-8) -> dict[str, torch.Tensor]:
    """u, u_x, u_xxx, u_t at every interior point, by least squares on its moved 5 x 5 neighbours."""
    nb = neighbourhoods(points)
    centre = nb[..., 12:13, :]                                    # the middle of the 25 neighbours
    rel = nb - centre
    dx = rel[..., 0] * grid.length
    dx = torch.remainder(dx + grid.length / 2, grid.length) - grid.length / 2  # periodic x
    dx = dx / grid.dx
    dt = rel[..., 1] * grid.t_end / grid.dt
    u = nb[..., 2] / grid.u_scale
    design = torch.stack([dx ** a * dt ** b for a, b in MONOMIALS], dim=-1)      # (..., 25, m)
    gram = design.transpose(-1, -2) @ design
    gram = gram + ridge * torch.eye(len(MONOMIALS), dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram, (design.transpose(-1, -2) @ u[..., None]))[..., 0]
    col = {ab: i for i, ab in enumerate(MONOMIALS)}
    return {"u": coef[..., col[(0, 0)]], "u_x": coef[..., col[(1, 0)]] / grid.dx,
            "u_xxx": 6 * coef[..., col[(3, 0)]] / grid.dx ** 3, "u_t": coef[..., col[(0, 1)]] / grid.dt}


def kdv_residual(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    d = local_derivatives(points, grid)
    return d["u_t"] + d["u"] * d["u_x"] + d["u_xxx"]


def validity(points: torch.Tensor, grid: Grid, threshold: float = 1e-4) -> torch.Tensor:
    """mean log max(|KdV residual|, threshold) over the interior points of the (moved) patches."""
    return torch.log(kdv_residual(points, grid).abs().clamp_min(threshold)).mean()


def flowed_validity(field: Field, points: torch.Tensor, grid: Grid, s: float, steps: int,
                    threshold: float = 1e-4) -> torch.Tensor:
    moved = rk4_flow(field, points.reshape(-1, 3), s, steps).reshape(points.shape)
    return validity(moved, grid, threshold)


# ---------------------------------------------------------------- known Lie point symmetries of KdV
def known_fields(grid: Grid) -> dict[str, Field]:
    """x- and t-translation, the Galilean boost (x + e t, u + e) and the scaling (lambda x, lambda^3 t,
    lambda^-2 u), written in scaled coordinates (not yet normalised)."""
    ones = lambda p: torch.ones_like(p[..., 0])
    zeros = lambda p: torch.zeros_like(p[..., 0])
    return {
        "x_translation": lambda p: torch.stack([ones(p), zeros(p), zeros(p)], -1),
        "t_translation": lambda p: torch.stack([zeros(p), ones(p), zeros(p)], -1),
        "galilean_boost": lambda p: torch.stack([p[..., 1] * grid.t_end / grid.length, zeros(p),
                                                 grid.u_scale * ones(p)], -1),
        "scaling": lambda p: torch.stack([p[..., 0], 3 * p[..., 1], -2 * p[..., 2]], -1),
    }


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<V, W> = mean_p V(p) . W(p) over the points (the paper's PDE inner product)."""
    return (a * b).sum(-1).mean()


def normalised(field: Field, points: torch.Tensor) -> Field:
    """``field`` divided by its RMS norm on ``points`` (a fixed constant)."""
    with torch.no_grad():
        norm = inner(field(points), field(points)).sqrt()
    return lambda p: field(p) / norm


def gram_schmidt(fields: list[Field], points: torch.Tensor) -> list[Field]:
    """Orthonormalise fields in order with the inner product on ``points`` (fixed linear combinations)."""
    with torch.no_grad():
        values = torch.stack([f(points.reshape(-1, 3)) for f in fields])          # (k, N, 3)
        gram = torch.einsum("anc,bnc->ab", values, values) / values.shape[1]
        mix = torch.linalg.inv(torch.linalg.cholesky(gram))                      # lower triangular
    return [(lambda p, row=mix[i]: sum(row[j] * fields[j](p) for j in range(i + 1)))
            for i in range(len(fields))]
