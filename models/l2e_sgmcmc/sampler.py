"""SGHMC with learned kinetic-energy gradients (L2E, Sec. 3) and the baselines it is compared with.

The Hamiltonian is H(theta, r) = U(theta) + g(theta, r) with D = diag(0, C I), Q = [[0, -I], [I, 0]], so no
correction term is needed. L2E learns the two gradients of the kinetic energy g,
alpha ~ d g / d theta and beta ~ d g / d r, with one small MLP applied to every weight; plain SGHMC is
g = |r|^2 / 2, i.e. alpha = 0 and beta = r. One step (symplectic Euler, beta evaluated again at the new
momentum; the features keep the old theta and gradient):

    r'     = r - eps [grad U~(theta) + alpha(theta, r) + C beta(theta, r)] + xi,   xi ~ N(0, 2 C eps T)
    theta' = theta + eps beta(theta, r')

with eps = sqrt(step_mult / N) for the task's real training-set size N, U~(theta) = N (mean minibatch
NLL + wd |theta|^2 / 2), and T the temperature knob of the official code (T = 1: the paper's noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .network import MLPSpec, loss_and_grad, nll_per_row

EMA_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
N_FEATURES = 3 + len(EMA_DECAYS)  # gradient, weight, momentum, six gradient EMAs
MOMENTUM_FEATURE = 2
NORM_EPS = 1e-5
SLICE_TENSORS = 16  # per-tensor statistics from slices up to this many tensors, else a scatter


@dataclass(frozen=True)
class Dynamics:
    """Constants of the SGHMC dynamics on one task; ``step_mult`` and ``temperature`` may be [B, 1]
    tensors (one value per chain: a tuning grid runs as one batch)."""

    n_data: int
    step_mult: float | torch.Tensor
    friction: float
    temperature: float | torch.Tensor
    weight_decay: float

    @property
    def eps(self):
        """eps = sqrt(step_mult / N): the step size follows the task's real training-set size."""
        if isinstance(self.step_mult, torch.Tensor):
            return torch.sqrt(self.step_mult / self.n_data)
        return math.sqrt(self.step_mult / self.n_data)

    def potential_grad(self, grad_nll: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.n_data * (grad_nll + self.weight_decay * theta)


def normalise_per_tensor(x: torch.Tensor, tensor_ids: torch.Tensor, n_tensors: int) -> torch.Tensor:
    """x / sqrt(mean over the layer tensor of x^2 + 1e-5), per row and feature (x is [B, F, D]).

    The weights of a tensor are contiguous, so the statistics come from slices when tensors are few
    (3x faster than a scatter on CPU); a scatter over ``tensor_ids`` serves many-tensor nets."""
    counts = torch.bincount(tensor_ids, minlength=n_tensors)
    if n_tensors <= SLICE_TENSORS:
        out, start = torch.empty_like(x), 0
        for length in counts.tolist():
            part = x[..., start:start + length]
            out[..., start:start + length] = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + NORM_EPS)
            start += length
        return out
    sq = torch.zeros(x.shape[0], x.shape[1], n_tensors, dtype=x.dtype, device=x.device)
    sq.index_add_(2, tensor_ids, x * x)
    scale = torch.rsqrt(sq / counts.to(x.dtype) + NORM_EPS)
    return x * scale[..., tensor_ids]


class SGHMCKinetic:
    """g = |r|^2 / 2: alpha = 0, beta = r (the sampler is then exactly SGHMC)."""

    uses_features = False

    def gradients(self, theta, r, grad_u, ema):
        return torch.zeros_like(r), r, None

    def beta_at(self, r_new, cache):
        return r_new


def kinetic_net_size(hidden: int) -> int:
    """Meta-parameters of the per-weight MLP 9 -> hidden -> hidden -> 2."""
    return N_FEATURES * hidden + hidden + hidden * hidden + hidden + hidden * 2 + 2


def init_kinetic_net(hidden: int, generator: torch.Generator) -> torch.Tensor:
    """Flat meta-parameters drawn like nn.Linear's default initialisation (weights stored in x out)."""
    parts = []
    for fan_in, fan_out in ((N_FEATURES, hidden), (hidden, hidden), (hidden, 2)):
        bound = 1.0 / math.sqrt(fan_in)
        parts.append((torch.rand(fan_in * fan_out + fan_out, generator=generator) * 2 - 1) * bound)
    return torch.cat(parts)


class LearnedKinetic:
    """alpha, beta from the per-weight MLP with M copies of its meta-parameters (``phi`` [M, P]); chain b
    uses copy b // (B / M). Features are laid out [B, 9, D] (weights last), so each layer is one batched
    matmul W^T [H, in] @ h [in, D] per chain: one MLP call covers every weight of every chain, and the long
    weight axis keeps the matmuls efficient."""

    uses_features = True

    def __init__(self, phi: torch.Tensor, hidden: int, exp_mult: float, precond_mult: float, spec):
        phi = phi if phi.dim() == 2 else phi.unsqueeze(0)
        m, h, f = phi.shape[0], hidden, N_FEATURES
        w1, b1, w2, b2, w3, b3 = torch.split(phi, [f * h, h, h * h, h, h * 2, 2], dim=1)
        self.w1, self.b1 = w1.reshape(m, f, h).transpose(1, 2), b1.reshape(m, h, 1)
        self.w2, self.b2 = w2.reshape(m, h, h).transpose(1, 2), b2.reshape(m, h, 1)
        self.w3, self.b3 = w3.reshape(m, h, 2).transpose(1, 2), b3.reshape(m, 2, 1)
        self.copies, self.exp_mult, self.precond_mult = m, exp_mult, precond_mult
        self.tensor_ids = spec.tensor_ids().to(phi.device)
        self.n_tensors = spec.n_tensors

    def _per_chain(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        return w if self.copies == rows else w.repeat_interleave(rows // self.copies, 0)

    def features(self, theta, r, grad_u, ema) -> torch.Tensor:
        raw = torch.cat([grad_u.unsqueeze(1), theta.unsqueeze(1), r.unsqueeze(1), ema], 1)
        return normalise_per_tensor(raw, self.tensor_ids, self.n_tensors)

    def gradients(self, theta, r, grad_u, ema):
        rows = r.shape[0]
        feats = self.features(theta, r, grad_u, ema)
        pre1 = torch.baddbmm(self._per_chain(self.b1, rows), self._per_chain(self.w1, rows), feats)
        out = self._tail(pre1, self.w3, self.b3, rows)
        return out[:, 0] * self.exp_mult, out[:, 1] * self.precond_mult, (pre1, feats[:, MOMENTUM_FEATURE:MOMENTUM_FEATURE + 1])

    def beta_at(self, r_new, cache):
        """beta at the new momentum: only the momentum feature changes, so the first layer's
        pre-activation is corrected rather than recomputed (a fused second evaluation)."""
        pre1, r_old = cache
        rows = r_new.shape[0]
        r_feat = normalise_per_tensor(r_new.unsqueeze(1), self.tensor_ids, self.n_tensors)
        pre1 = pre1 + self._per_chain(self.w1[:, :, MOMENTUM_FEATURE:MOMENTUM_FEATURE + 1], rows) * (r_feat - r_old)
        out = self._tail(pre1, self.w3[:, 1:], self.b3[:, 1:], rows)
        return out[:, 0] * self.precond_mult

    def _tail(self, pre1, w3, b3, rows):
        h = torch.baddbmm(self._per_chain(self.b2, rows), self._per_chain(self.w2, rows), torch.relu(pre1)).relu_()
        return torch.baddbmm(self._per_chain(b3, rows), self._per_chain(w3, rows), h)


def sgmcmc_step(theta, r, grad_u, ema, eps, dyn: Dynamics, kinetic, noise):
    """One symplectic-Euler step of the module docstring; ``noise`` is standard normal [B, D] (scaled
    here to N(0, 2 C eps T)). Returns (theta', r')."""
    alpha, beta, cache = kinetic.gradients(theta, r, grad_u, ema)
    noise_std = (2 * dyn.friction * eps * dyn.temperature) ** 0.5
    r_new = r - eps * (grad_u + alpha + dyn.friction * beta) + noise_std * noise
    theta_new = theta + eps * kinetic.beta_at(r_new, cache)
    return theta_new, r_new


def update_emas(ema: torch.Tensor, grad_u: torch.Tensor) -> torch.Tensor:
    """The six gradient EMAs, [B, 6, D]."""
    decays = torch.tensor(EMA_DECAYS, dtype=ema.dtype, device=ema.device).view(1, -1, 1)
    return decays * ema + (1 - decays) * grad_u.unsqueeze(1)


def _tile(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Shared randomness: group g's draw serves rows g, g + G, g + 2G, ..."""
    return x.repeat(rows // x.shape[0], *([1] * (x.dim() - 1)))


Schedule = Callable[[int], tuple[float, float]]


def constant_schedule(t: int) -> tuple[float, float]:
    return 1.0, 1.0


def run_chains(spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor, kinetic,
               dyn: Dynamics, steps: int, batch_size: int, sample_steps: Sequence[int],
               generator: torch.Generator, schedule: Schedule = constant_schedule,
               groups: int | None = None) -> torch.Tensor:
    """Run B chains from ``theta0`` [B, D] for ``steps`` steps; return the samples [K, B, D] taken at
    ``sample_steps``. ``schedule(t)`` gives (step-size scale, noise on/off) for cyclical SGHMC.
    ``groups`` = G < B shares minibatches and noise between rows b and b + G (antithetic ES pairs)."""
    b, d = theta0.shape
    g = groups or b
    theta, r = theta0.clone(), torch.zeros_like(theta0)
    ema = torch.zeros(b, len(EMA_DECAYS), d, device=theta0.device) if kinetic.uses_features else None
    wanted, samples = set(sample_steps), []
    for t in range(steps):
        idx = _tile(torch.randint(0, x.shape[0], (g, batch_size), generator=generator,
                                  device=generator.device), b)
        _, grad = loss_and_grad(spec, theta, x[idx], y[idx])
        grad_u = dyn.potential_grad(grad, theta)
        if ema is not None:
            ema = update_emas(ema, grad_u)
        scale, noise_on = schedule(t)
        noise = _tile(torch.randn(g, d, generator=generator, device=generator.device), b) * noise_on
        theta, r = sgmcmc_step(theta, r, grad_u, ema, dyn.eps * scale, dyn, kinetic, noise)
        if t in wanted:
            samples.append(theta.clone())
    return torch.stack(samples) if samples else theta[:0].unsqueeze(0)


def thinned_steps(steps: int, burn_in: int, samples: int) -> list[int]:
    """``samples`` evenly spaced steps after ``burn_in``, the last one at the final step."""
    gap = (steps - burn_in) / samples
    return [burn_in + round(gap * (k + 1)) - 1 for k in range(samples)]


def cyclical_schedule(steps: int, cycles: int, explore_fraction: float) -> Schedule:
    """Zhang et al. (2020): eps_t = eps_0 (cos(pi (t mod L) / L) + 1) / 2 with L = steps / cycles; the
    first ``explore_fraction`` of each cycle explores without noise, the rest samples."""
    length = math.ceil(steps / cycles)

    def schedule(t: int) -> tuple[float, float]:
        u = (t % length) / length
        return (math.cos(math.pi * u) + 1) / 2, float(u >= explore_fraction)

    return schedule


def cyclical_sample_steps(steps: int, cycles: int, samples: int, explore_fraction: float) -> list[int]:
    """samples / cycles steps at the end of each cycle's sampling phase, evenly spaced within it."""
    if samples % cycles:
        raise ValueError(f"{samples} samples do not split into {cycles} cycles")
    length, per = math.ceil(steps / cycles), samples // cycles
    gap = max(1, int((1 - explore_fraction) * length) // per)
    out = []
    for c in range(cycles):
        end = min(steps, (c + 1) * length) - 1
        out += [end - gap * (per - 1 - k) for k in range(per)]
    return out


def deep_ensemble(spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor, steps: int,
                  batch_size: int, lr: float, weight_decay: float, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``theta0`` trained independently by Adam on mean NLL + wd |theta|^2 / 2 (the MAP of the
    same posterior); Adam is elementwise, so one batched optimiser is B independent ones."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    b = theta.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (b, batch_size), generator=generator, device=generator.device)
        with torch.enable_grad():
            loss = nll_per_row(spec, theta, x[idx], y[idx]).sum() + weight_decay / 2 * (theta ** 2).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return theta.detach()
