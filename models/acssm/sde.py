"""Simulation-free latent dynamics of ACSSM: input checks, time gaps, the affine parallel scan and the
linear latent SDE with closed-form Gaussian moments (Sec. 3 of the paper)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan
from torch.nn.utils.parametrizations import orthogonal


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def check_series(times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a padded batch of irregular series and return ``valid`` ([B, K] bool).

    times [B, K] (non-negative, strictly increasing over the valid prefix), values [B, K, D] (NaN allowed
    only where mask == 0), mask [B, K, D] in {0, 1}, valid [B, K] bool with padding only at the end.
    """
    if times.ndim != 2 or values.ndim != 3 or mask.shape != values.shape or values.shape[:2] != times.shape:
        raise ValueError(f"expected times [B,K], values/mask [B,K,D]; got {tuple(times.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    if times.shape[0] == 0 or times.shape[1] == 0:
        raise ValueError("empty series: need at least one time point")
    if valid is None:
        valid = torch.ones(times.shape, dtype=torch.bool, device=times.device)
    valid = valid.bool()
    if valid.shape != times.shape:
        raise ValueError(f"valid must be [B,K] like times, got {tuple(valid.shape)}")
    n_valid = valid.sum(1)
    if (n_valid == 0).any():
        raise ValueError(f"empty series at batch index {int((n_valid == 0).nonzero()[0])}")
    if (valid.int().diff(dim=1) > 0).any():
        raise ValueError("padding must come after the valid points (valid must be a prefix)")
    if torch.isnan(times[valid]).any() or (times[valid] < 0).any():
        raise ValueError("times must be finite and non-negative")
    gaps = times.diff(dim=1)
    both = valid[:, 1:] & valid[:, :-1]
    if (gaps[both] <= 0).any():
        b = int((both & (gaps <= 0)).nonzero()[0, 0])
        raise ValueError(f"times must be strictly increasing (unsorted or duplicate times in series {b})")
    if not torch.isin(mask.unique(), torch.tensor([0.0, 1.0], device=mask.device, dtype=mask.dtype)).all():
        raise ValueError("mask must hold only 0 and 1")
    if torch.isnan(values[(mask > 0) & valid[..., None]]).any():
        raise ValueError("NaN in an observed value (NaNs are allowed only where mask == 0)")
    return valid


def time_gaps(times: torch.Tensor, valid: torch.Tensor, t0: float = 0.0) -> torch.Tensor:
    """dt_k = t_k - t_{k-1} with t_0 = t0; zero on padding (identity transition)."""
    prev = torch.cat([torch.full_like(times[:, :1], t0), times[:, :-1]], dim=1)
    return torch.where(valid, times - prev, torch.zeros_like(times))



# --------------------------------------------------------------------------------------------------
# Simulation-free latent dynamics
# --------------------------------------------------------------------------------------------------
def affine_combine(first, second):
    """Compose x -> a1 x + b1 then x -> a2 x + b2: (a2 a1, a2 b1 + b2) (associative)."""
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


def affine_scan(a: torch.Tensor, b: torch.Tensor, dim: int = 1):
    """Prefix composition of x_k = a_k x_{k-1} + b_k along ``dim`` in O(log K) depth (torch's scan)."""
    mode = "pointwise" if a.device.type in ("cuda", "xpu") else "generic"
    return associative_scan(affine_combine, (a, b), dim=dim, combine_mode=mode)


def affine_sequential(a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Reference: x_k = a_k x_{k-1} + b_k by a Python loop (returns x_1..x_K stacked along ``dim``)."""
    out, x = [], x0
    for k in range(a.shape[dim]):
        x = a.select(dim, k) * x + b.select(dim, k)
        out.append(x)
    return torch.stack(out, dim=dim)


class LinearLatentSDE(nn.Module):
    """dX = (A(alpha) X + alpha) dt + sigma dW on each interval, A(alpha) = E diag(lambda(alpha)) E^T.

    lambda(alpha) = -sum_l softmax(c(alpha))_l exp(D_l) (a mixture of negative-definite bases in a learned
    orthogonal eigenbasis E). In eigen-coordinates x~ = E^T X every coordinate is an independent OU
    process, so with alpha constant over a gap dt the moments are closed form:
        m_k = e^{lambda dt} m_{k-1} + (e^{lambda dt} - 1)/lambda * (E^T alpha)
        v_k = e^{2 lambda dt} v_{k-1} + sigma^2 (e^{2 lambda dt} - 1)/(2 lambda)
    Both are affine recursions combined with a parallel scan over the time gaps.
    """

    def __init__(self, state_dim: int, num_basis: int, sigma: float = 1.0, init_sigma: float = 1.0):
        super().__init__()
        self.state_dim, self.sigma = state_dim, sigma
        self.basis = orthogonal(nn.Linear(state_dim, state_dim, bias=False))
        self.log_rates = nn.Parameter(torch.linspace(-2.0, 1.0, num_basis)[:, None]
                                      + 0.1 * torch.randn(num_basis, state_dim))
        self.mixture = nn.Linear(state_dim, num_basis)
        self.mean0 = nn.Parameter(torch.zeros(state_dim))
        self.logvar0 = nn.Parameter(torch.full((state_dim,), math.log(init_sigma)))

    @property
    def eigenbasis(self) -> torch.Tensor:
        """E: orthogonal [d, d]; column j is the j-th eigenvector."""
        return self.basis.weight

    def rates(self, alpha: torch.Tensor) -> torch.Tensor:
        """lambda(alpha) < 0, [..., d]."""
        weights = torch.softmax(self.mixture(alpha), dim=-1)
        return -(weights @ torch.exp(self.log_rates))

    def transitions(self, alpha: torch.Tensor, dt: torch.Tensor):
        """Per-gap affine maps (a_m, b_m) for the mean and (a_v, b_v) for the variance (eigen-coords)."""
        lam = self.rates(alpha).clamp(max=-1e-4)
        ldt = lam * dt[..., None]
        alpha_eig = alpha @ self.eigenbasis                         # E^T alpha, row-vector form
        a_m = torch.exp(ldt)
        b_m = torch.expm1(ldt) / lam * alpha_eig
        a_v = torch.exp(2 * ldt)
        b_v = self.sigma ** 2 * torch.expm1(2 * ldt) / (2 * lam)
        return a_m, b_m, a_v, b_v

    def initial(self, batch: int):
        shape = (batch, self.state_dim)
        return self.mean0.expand(shape), torch.exp(self.logvar0).expand(shape)

    def moments(self, alpha: torch.Tensor, dt: torch.Tensor, parallel: bool = True):
        """Eigen-coordinate means and variances [B, K, d] at t_1..t_K (exact for piecewise-const alpha)."""
        a_m, b_m, a_v, b_v = self.transitions(alpha, dt)
        m0, v0 = self.initial(alpha.shape[0])
        if parallel:
            cm_a, cm_b = affine_scan(a_m, b_m, dim=1)
            cv_a, cv_b = affine_scan(a_v, b_v, dim=1)
            return cm_a * m0[:, None] + cm_b, cv_a * v0[:, None] + cv_b + 1e-6
        return affine_sequential(a_m, b_m, m0), affine_sequential(a_v, b_v, v0) + 1e-6

    def to_state(self, eig: torch.Tensor) -> torch.Tensor:
        """x~ -> X = E x~ (row-vector form)."""
        return eig @ self.eigenbasis.T

    def state_moments(self, alpha, dt):
        """Mean [B,K,d] and covariance [B,K,d,d] of X in the original coordinates."""
        m, v = self.moments(alpha, dt)
        E = self.eigenbasis
        return self.to_state(m), E @ torch.diag_embed(v) @ E.T
