"""Generator network, its hard orthonormality constraint, regularisers and the training loop.

V_i(p) = sum_j A_ij H_j(p): a shared trunk with one head H_j per generator (periodic in X through a
(cos 2 pi X, sin 2 pi X) embedding). A = chol(G)^-1 with G_ab = <H_a, H_b> on the batch's points, i.e.
Gram-Schmidt in function space: every V_i has unit RMS norm and <V_i, V_j> = 0 exactly on those points,
so no head can duplicate another (the soft arccos penalty let a head copy a translation). The loss is
sum_i validity(Phi_i^s(patch)) with s = +-alpha, alpha ~ U(0, sigma), plus a Lipschitz hinge and, in
the last part of training, the paper's Sobolev (H^2) penalty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .validity import Grid, flowed_validity, inner


class GeneratorNet(nn.Module):
    """Trunk embed(p) -> width -> width (SiLU), heads width -> head_width -> 3 (one per generator)."""

    def __init__(self, n_generators: int, width: int, head_width: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(width, head_width), nn.SiLU(),
                                                 nn.Linear(head_width, 3)) for _ in range(n_generators))
        self.register_buffer("mix", torch.eye(n_generators))   # A, fixed after training

    @staticmethod
    def embed(p: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * p[..., 0]
        return torch.stack([torch.cos(angle), torch.sin(angle), p[..., 1], p[..., 2]], dim=-1)

    def raw(self, p: torch.Tensor) -> torch.Tensor:
        """Head outputs H(p): (..., n_generators, 3)."""
        h = self.trunk(self.embed(p))
        return torch.stack([head(h) for head in self.heads], dim=-2)

    def field(self, i: int, mix: torch.Tensor | None = None):
        """The orthonormalised generator V_i = sum_j A_ij H_j as a function of points."""
        mix = self.mix if mix is None else mix
        return lambda p: torch.einsum("j,...jc->...c", mix[i], self.raw(p))


def orthonormaliser(raw: torch.Tensor) -> torch.Tensor:
    """A = L^-1 with L L^T = G, G_ab = mean_p H_a(p) . H_b(p): rows of A give orthonormal fields."""
    flat = raw.reshape(-1, raw.shape[-2], raw.shape[-1])
    gram = torch.einsum("nac,nbc->ab", flat, flat) / flat.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + 1e-9 * gram.diagonal().mean() * eye)  # relative jitter
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def lipschitz_hinge(values: torch.Tensor, grid_step: tuple[float, float], tau: float) -> torch.Tensor:
    """mean max(|V(p') - V(p)| / |p' - p| - tau, 0) over t- and x-neighbours of a patch grid.

    ``values`` (n, st, sx, k, 3) are the fields on the unmoved patch points; ``grid_step`` is the
    (T, X) spacing in scaled coordinates."""
    dt = (values[:, 1:] - values[:, :-1]).norm(dim=-1) / grid_step[0]
    dx = (values[:, :, 1:] - values[:, :, :-1]).norm(dim=-1) / grid_step[1]
    return (dt - tau).clamp_min(0).mean() + (dx - tau).clamp_min(0).mean()


def sobolev_penalty(values: torch.Tensor) -> torch.Tensor:
    """log mean_k |FFT_x V|^2 ((1 + k^2)^2 - 1) over the x rows of a patch grid (an H^2 seminorm; the
    paper's PDE smoothness term). ``values`` (n, st, sx, k, 3); k in radians per grid step."""
    coef = torch.fft.rfft(values, dim=2)
    k = 2 * torch.pi * torch.fft.rfftfreq(values.shape[2], dtype=values.dtype)
    weight = ((1 + k ** 2) ** 2 - 1)[None, None, :, None, None]
    return torch.log((coef.abs() ** 2 * weight).mean())


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    sigma: float          # flow magnitude alpha ~ U(0, sigma), random sign
    rk4_steps: int
    lipschitz_weight: float
    lipschitz_tau: float
    threshold: float      # th of log max(|residual|, th)
    sobolev_weight: float
    sobolev_fraction: float  # the Sobolev term is on in this last fraction of the steps (paper: 10 of 100 epochs)


def generator_loss(net: GeneratorNet, points: torch.Tensor, grid: Grid, cfg: TrainConfig,
                   generator: torch.Generator, sobolev: bool = False) -> tuple[torch.Tensor, list[float]]:
    """sum_i validity(Phi_i^{s_i}(points)) + lipschitz weight * hinge (+ sobolev weight * H^2 term),
    with A from this batch."""
    raw = net.raw(points)
    mix = orthonormaliser(raw)
    n = mix.shape[0]
    alpha = torch.rand(n, generator=generator, dtype=points.dtype) * cfg.sigma
    sign = torch.randint(0, 2, (n,), generator=generator).to(points.dtype) * 2 - 1
    scores = [flowed_validity(net.field(i, mix), points, grid, alpha[i] * sign[i], cfg.rk4_steps,
                              cfg.threshold) for i in range(n)]
    fields = torch.einsum("ij,...jc->...ic", mix, raw)
    step = (grid.dt / grid.t_end, grid.dx / grid.length)
    loss = sum(scores) + cfg.lipschitz_weight * lipschitz_hinge(fields, step, cfg.lipschitz_tau)
    if sobolev and cfg.sobolev_weight > 0:
        loss = loss + cfg.sobolev_weight * sobolev_penalty(fields)
    return loss, [float(s.detach()) for s in scores]


def fit_generators(net: GeneratorNet, sample_points, reference_points: torch.Tensor, grid: Grid,
                   cfg: TrainConfig, generator: torch.Generator, on_step=None) -> GeneratorNet:
    """Adam on ``generator_loss`` over batches from ``sample_points(generator)``; then fix A on
    ``reference_points`` so the final fields are orthonormal on the data."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.steps // 2], 0.1)
    sobolev_from = cfg.steps - round(cfg.sobolev_fraction * cfg.steps)
    for step in range(cfg.steps):
        loss, scores = generator_loss(net, sample_points(generator), grid, cfg, generator,
                                      sobolev=step >= sobolev_from)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step, float(loss.detach()), scores)
    with torch.no_grad():
        net.mix.copy_(orthonormaliser(net.raw(reference_points)))
    return net


def correlation_matrix(fields: list, points: torch.Tensor) -> torch.Tensor:
    """corr_ab = <V_a, V_b> / (|V_a| |V_b|) on ``points``."""
    flat = points.reshape(-1, 3)
    with torch.no_grad():
        values = [f(flat) for f in fields]
        norms = torch.stack([inner(v, v).sqrt() for v in values])
        ip = torch.stack([torch.stack([inner(a, b) for b in values]) for a in values])
    return ip / (norms[:, None] * norms[None, :])


def span_correlation(target, fields: list, points: torch.Tensor) -> float:
    """Multiple correlation of ``target`` with span(fields): |projection| / |target| (least squares)."""
    if not fields:
        return 0.0
    flat = points.reshape(-1, 3)
    with torch.no_grad():
        y = target(flat).reshape(-1)
        basis = torch.stack([f(flat).reshape(-1) for f in fields], dim=1)
        coef = torch.linalg.lstsq(basis, y[:, None]).solution
        return float((basis @ coef).norm() / y.norm())
