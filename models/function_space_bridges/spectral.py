"""The reference process: an OU SDE in a Hilbert space, one independent scalar OU per cosine mode.

On the unit interval (or square) with Neumann boundaries, A = -c Laplacian + 1 has eigenfunctions
phi_k(x) = prod_i c_i cos(pi k_i x_i) (c_i = 1 for k_i = 0, else sqrt 2) and eigenvalues
a_k = c pi^2 |k|^2 + 1, fixed on the domain: a mode has the same a_k on every grid (the official code
divides by the grid size, a_k = pi^2 |k|^2 / h^2 + 1, so its operator changes with resolution;
c = 1 / h_train^2 held fixed is that operator at the training grid, the same on every grid).
Coefficients are L2-normalised, x_k = <f, phi_k>, so a function has the same coefficients on every
grid. Q has eigenvalues a_k^(-s); it is trace-class when s > d/2. Per mode,
dX_k = -a_k X_k dt + g_k dW_k with g_k = sigma a_k^(-s/2).

With v(s, t) = (1 - exp(-2a(t - s))) / (2a) (the transition variance per unit g^2), the bridge pinned at
x_s (time s) and x_1 (time 1) has at time t (notes section 2, IDBM/DBFS eq. for the OU bridge)
  mean = [v(t,1) e^{-a(t-s)} x_s + v(s,t) e^{-a(1-t)} x_1] / v(s,1),   var = g^2 v(s,t) v(t,1) / v(s,1),
where v(s,1) = v(s,t) e^{-2a(1-t)} + v(t,1). The h-transform drift towards a (predicted) endpoint is
  -a x + e^{-a(1-t)} (x_1 - e^{-a(1-t)} x) / v(t,1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n): X = C f, f = C^T X."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * k * (i + 0.5) / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def variance_factor(a: torch.Tensor, dt) -> torch.Tensor:
    """v = (1 - exp(-2 a dt)) / (2 a), computed without cancellation for small a dt."""
    dt = torch.as_tensor(dt, dtype=a.dtype)
    return -torch.expm1(-2.0 * a * dt) / (2.0 * a)


@dataclass
class SpectralOU:
    """The OU reference process on a ``shape`` grid (``(n,)`` or ``(n, n)``) of cell centres."""

    shape: tuple[int, ...]
    spectrum_exponent: float   # s: Q has eigenvalues a_k^-s (trace-class when s > d / 2)
    sigma: float               # overall noise scale
    laplacian_scale: float = 1.0  # c in A = -c Laplacian + 1
    device: str = "cpu"

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        if len(self.shape) not in (1, 2):
            raise ValueError(f"grids are 1-D or 2-D, got shape {self.shape}")
        self._dct = [dct_matrix(n).to(self.device) for n in self.shape]
        freq = sum(k ** 2 for k in torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=self.device)
                                                  for n in self.shape],
                                                  indexing="ij"))
        self.eigenvalues = self.laplacian_scale * math.pi ** 2 * freq + 1.0  # a_k, fixed on the domain
        self.diffusion = self.sigma * self.eigenvalues ** (-self.spectrum_exponent / 2)  # g_k
        self.norm = math.sqrt(math.prod(self.shape))                      # grid sum -> L2 integral

    # ----------------------------------------------------------------- basis
    def to_coeffs(self, f: torch.Tensor) -> torch.Tensor:
        """L2-normalised cosine coefficients of grid values f [..., *shape]."""
        c = self._dct[-1].to(f.dtype)
        out = f @ c.T
        if len(self.shape) == 2:
            out = (self._dct[0].to(f.dtype) @ out)
        return out / self.norm

    def from_coeffs(self, x: torch.Tensor) -> torch.Tensor:
        c = self._dct[-1].to(x.dtype)
        out = x @ c
        if len(self.shape) == 2:
            out = self._dct[0].to(x.dtype).T @ out
        return out * self.norm

    def max_stiffness(self, dt: float) -> float:
        """max_k a_k dt: Euler-Maruyama on the linear part is unstable beyond 2."""
        return float(self.eigenvalues.max()) * dt

    # ----------------------------------------------------------------- bridge
    def _coefficients(self, s, t):
        a = self.eigenvalues
        v_st, v_t1 = variance_factor(a, t - s), variance_factor(a, 1.0 - t)
        decay_to_t, decay_to_1 = torch.exp(-a * (t - s)), torch.exp(-a * (1.0 - t))
        v_s1 = v_st * decay_to_1 ** 2 + v_t1
        return (v_t1 * decay_to_t / v_s1, v_st * decay_to_1 / v_s1, v_st * v_t1 / v_s1)

    def bridge_moments(self, xs: torch.Tensor, x1: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
        """Mean and variance of the bridge's coefficients at time t (per sample s, t of shape [B])."""
        s = s.to(self.eigenvalues).reshape(-1, *([1] * (xs.ndim - 1)))  # [B, (C,) *shape]
        t = t.to(self.eigenvalues).reshape(-1, *([1] * (xs.ndim - 1)))
        c_start, c_end, c_var = self._coefficients(s, t)
        mean = c_start.to(xs.dtype) * xs + c_end.to(xs.dtype) * x1
        return mean, (c_var * self.diffusion ** 2).to(xs.dtype)

    def bridge_sample(self, f0: torch.Tensor, f1: torch.Tensor, t: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t of the reference bridge from f0 (t = 0) to f1 (t = 1), as grid values."""
        x0, x1 = self.to_coeffs(f0), self.to_coeffs(f1)
        mean, var = self.bridge_moments(x0, x1, torch.zeros_like(t), t)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return self.from_coeffs(mean + var.sqrt() * noise)

    def exact_step(self, f: torch.Tensor, f1_hat: torch.Tensor, t: float, t_next: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the bridge towards the predicted endpoint at t_next: stable for any a dt."""
        x, x1 = self.to_coeffs(f), self.to_coeffs(f1_hat)
        b = x.shape[0]
        full = lambda v: torch.full((b,), v, dtype=torch.float64, device=x.device)
        mean, var = self.bridge_moments(x, x1, full(t), full(t_next))
        if t_next < 1.0:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            mean = mean + var.sqrt() * noise
        return self.from_coeffs(mean)

    def euler_maruyama_step(self, f: torch.Tensor, f1_hat: torch.Tensor, t: float, t_next: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """One Euler-Maruyama step of the h-transformed SDE (noise dropped on the last step)."""
        a = self.eigenvalues
        dt = t_next - t
        x, x1 = self.to_coeffs(f), self.to_coeffs(f1_hat)
        decay = torch.exp(-a * (1.0 - t)).to(x.dtype)
        drift = -a.to(x.dtype) * x + decay * (x1 - decay * x) / variance_factor(a, 1.0 - t).to(x.dtype)
        x = x + drift * dt
        if t_next < 1.0:
            x = x + self.diffusion.to(x.dtype) * math.sqrt(dt) * torch.randn(x.shape, generator=generator,
                                                                              dtype=x.dtype, device=x.device)
        return self.from_coeffs(x)

    def transition_sample(self, f: torch.Tensor, dt: float, generator: torch.Generator | None = None):
        """The unconditioned reference process after dt (exact OU transition), grid values."""
        a = self.eigenvalues
        x = self.to_coeffs(f)
        std = (self.diffusion * variance_factor(a, dt).sqrt()).to(x.dtype)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = torch.exp(-a * dt).to(x.dtype) * x + std * noise
        return self.from_coeffs(x)
