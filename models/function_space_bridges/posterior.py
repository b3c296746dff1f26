"""Bayesian learning by stochastic optimal control: GP-regression posteriors with the relative-entropy loss.

The reference process started at X_0 = 0 has the Gaussian terminal law mu = N(0, diag(g_k^2 v_k(0, 1)))
in the cosine basis: the prior. With observations y = f(x_obs) + noise, the posterior has the
Radon-Nikodym derivative h~(f) proportional to the likelihood with respect to mu, and the control that
minimises (notes section 2, "Bayesian learning")
  J(alpha) = E[ sum_n KL_n(alpha) - log h~(X_1) ],
where KL_n is the relative entropy of the controlled step to the reference step, steers X_1 to the
posterior (the Doob h-transform). Steps are the exact OU transitions plus a control held constant over
the step: X' = e^{-a dt} X + g phi u + g sqrt(v(dt)) eps with phi = (1 - e^{-a dt}) / a, whose KL is
u^2 phi^2 / (2 v(dt)) per mode (-> |u|^2 dt / 2 as dt -> 0). The control network is amortised over
observation sets (it reads y and the mask), and the exact Gaussian posterior is its check.
"""
from __future__ import annotations

import torch
from torch import nn

from .operator import timestep_embedding
from .spectral import SpectralOU, variance_factor


class ControlNet(nn.Module):
    """u(X_t, t | y, mask): an MLP over the coefficients, the masked observations and the time."""

    def __init__(self, n: int, width: int, depth: int, time_width: int = 16):
        super().__init__()
        self.time_width = time_width
        layers, inp = [], 3 * n + time_width
        for _ in range(depth):
            layers += [nn.Linear(inp, width), nn.SiLU()]
            inp = width
        layers.append(nn.Linear(inp, n))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.time_width).to(x.dtype)
        return self.net(torch.cat([x, y * mask, mask, temb], dim=-1))


def prior_variance(ou: SpectralOU) -> torch.Tensor:
    """Variance of each coefficient of X_1 when X_0 = 0: g_k^2 v_k(0, 1)."""
    return ou.diffusion ** 2 * variance_factor(ou.eigenvalues, 1.0)


def basis(ou: SpectralOU) -> torch.Tensor:
    """B with grid values f = B c (c: L2-normalised coefficients)."""
    return ou.from_coeffs(torch.eye(ou.shape[0], dtype=torch.float64, device=ou.eigenvalues.device))


def exact_posterior(ou: SpectralOU, y: torch.Tensor, mask: torch.Tensor, noise_std: float):
    """Exact GP posterior mean and variance on the grid for each task (y, mask: [T, n])."""
    b = basis(ou).T                                   # rows: grid points, columns: modes
    prior_inv = torch.diag(1.0 / prior_variance(ou))
    means, variances = [], []
    for yi, mi in zip(y.double(), mask.bool()):
        h = b[mi]
        precision = prior_inv + h.T @ h / noise_std ** 2
        cov = torch.linalg.inv(precision)
        coef = cov @ h.T @ yi[mi] / noise_std ** 2
        means.append(b @ coef)
        variances.append(torch.einsum("ik,kl,il->i", b, cov, b))
    return torch.stack(means), torch.stack(variances)


def sample_prior(ou: SpectralOU, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    std = prior_variance(ou).sqrt()
    noise = torch.randn(count, ou.shape[0], generator=generator, dtype=torch.float64, device=std.device)
    return ou.from_coeffs(noise * std)


def simulate_controlled(control: ControlNet, ou: SpectralOU, y: torch.Tensor, mask: torch.Tensor,
                        steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X_1 (grid values) and the path's relative entropy to the reference, per path (differentiable)."""
    a, g = ou.eigenvalues.float(), ou.diffusion.float()
    dt = 1.0 / steps
    decay = torch.exp(-a * dt)
    phi = -torch.expm1(-a * dt) / a
    std = variance_factor(a, dt).sqrt()
    x = torch.zeros_like(y)
    kl = torch.zeros(y.shape[0], device=y.device)
    for i in range(steps):
        t = torch.full((y.shape[0],), i * dt, device=y.device)
        u = control(x, y, mask, t)
        x = decay * x + g * phi * u + g * std * torch.randn_like(x)
        kl = kl + 0.5 * ((u * phi / std) ** 2).sum(-1)
    return ou.from_coeffs(x), kl


def relative_entropy_loss(control: ControlNet, ou: SpectralOU, y: torch.Tensor, mask: torch.Tensor,
                          noise_std: float, steps: int) -> torch.Tensor:
    """E[KL(path) - log-likelihood(X_1)]: minimised by the posterior (up to log Z)."""
    f1, kl = simulate_controlled(control, ou, y, mask, steps)
    log_lik = -0.5 * (((y - f1) * mask) ** 2).sum(-1) / noise_std ** 2
    return (kl - log_lik).mean()


def random_tasks(ou: SpectralOU, count: int, context: tuple[int, int], noise_std: float,
                 generator: torch.Generator | None = None):
    """Regression tasks from the prior: (true f, noisy y, context mask), each [count, n]."""
    n = ou.shape[0]
    f = sample_prior(ou, count, generator).float()
    y = f + noise_std * torch.randn(f.shape, generator=generator, device=f.device)
    sizes = torch.randint(context[0], context[1] + 1, (count,), generator=generator)
    order = torch.argsort(torch.rand(count, n, generator=generator), dim=-1)
    mask = (order < sizes[:, None]).float().to(f.device)
    return f, y, mask
