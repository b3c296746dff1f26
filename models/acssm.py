"""ACSSM: amortized control of a continuous (linear) state space model for irregular time series.

Park, Lee & Lee, "Amortized Control of Continuous State Space Feynman-Kac Model for Irregular Time
Series", ICLR 2025 (arXiv:2410.05602). Written from the paper's equations; no code was copied.

Data flow (one batch of B irregular series, K time points each, padded at the end):

    (t_k, y_k, mask_k) --ObservationEncoder--> z_k              (Transformer + GRU; full or causal)
    z_k --control--> alpha_k = B z_k                             (amortized control, const. on (t_{k-1}, t_k])
    alpha, dt --LinearLatentSDE.moments--> N(m_k, P_k)           (closed form + associative scan over gaps)
    X_k ~ N(m_k, P_k) --decoder--> p(target_k | X_k)             (Gaussian, fixed variance / categorical)

Loss (negative ELBO, Sec. 3 of the paper): task NLL + lambda_control * 1/2 sum_k ||alpha_k||^2 dt_k
+ lambda_potential * sum_k -log g_k(u_k | X_k), where u_k is the detached observation embedding
(the auxiliary observation of the multi-marginal h-transform potential).

Baselines of the same interface: ``GRUDelta`` (GRU with time-gap inputs) and ``TorchsdeLatentSDE``
(the same encoder and ELBO, but a neural prior drift solved step by step with torchsde's Euler scheme).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchsde
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan
from torch.nn.utils.parametrizations import orthogonal

TASKS = ("regression", "classification")


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
# Encoder (data assimilation): Transformer over (embedding + time encoding), then a GRU
# --------------------------------------------------------------------------------------------------
def sinusoidal_time_encoding(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Transformer-style encoding of continuous times (scaled by ``scale``) -> [..., dim]."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    ang = (t * scale)[..., None] * freq
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class ObservationEncoder(nn.Module):
    """z_k = GRU(Transformer(MLP([y*mask, mask]) + PE(t)))_k; ``causal`` = past-only ("history") attention."""

    def __init__(self, obs_dim: int, width: int, n_layers: int = 1, n_heads: int = 1, dropout: float = 0.0,
                 time_scale: float = 1.0, causal: bool = False):
        super().__init__()
        self.width, self.time_scale, self.causal = width, time_scale, causal
        self.embed = nn.Sequential(nn.Linear(2 * obs_dim, width), nn.GELU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, n_heads, 2 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.out = nn.Linear(width, width)

    def forward(self, times, values, mask, valid):
        x = torch.where(mask > 0, torch.nan_to_num(values), torch.zeros_like(values))
        u = self.embed(torch.cat([x, mask], dim=-1))                    # auxiliary observation embedding
        h = u + sinusoidal_time_encoding(times, self.width, self.time_scale)
        K = times.shape[1]
        attn = (torch.ones(K, K, dtype=torch.bool, device=times.device).triu(1) if self.causal else None)
        h = self.transformer(h, mask=attn, src_key_padding_mask=~valid, is_causal=self.causal)
        h, _ = self.gru(h)
        return self.out(h), u


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


# --------------------------------------------------------------------------------------------------
# Shared heads and the ELBO
# --------------------------------------------------------------------------------------------------
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, out))


@dataclass
class LossWeights:
    """Weights of the two non-task ELBO terms (official defaults 1e-6 and 1e-8)."""
    control: float = 1e-6
    potential: float = 1e-8


def task_nll(pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor, task: str,
             obs_var: float) -> torch.Tensor:
    """Summed -log p(target | sample) over observed target entries, averaged over samples.

    pred: [S, B, K, out] (means or logits); target [B, K, out] (regression) or [B, K] class ids;
    target_mask [B, K, out] or [B, K].
    """
    if task == "regression":
        t = torch.nan_to_num(target)
        nll = 0.5 * (pred - t) ** 2 / obs_var + 0.5 * math.log(2 * math.pi * obs_var)
        return (nll * target_mask).sum() / pred.shape[0]
    logp = torch.log_softmax(pred, dim=-1)
    tgt = target.clamp(min=0).long()[None, ..., None].expand(pred.shape[0], -1, -1, 1)
    nll = -logp.gather(-1, tgt)[..., 0]
    return (nll * target_mask).sum() / pred.shape[0]


def point_prediction(pred: torch.Tensor, task: str) -> torch.Tensor:
    """Mean over samples (regression) or averaged class probabilities (classification)."""
    return pred.mean(0) if task == "regression" else torch.softmax(pred, -1).mean(0)


class _ControlledLatentModel(nn.Module):
    """Encoder + control + decoder + potential shared by ACSSM and the torchsde latent SDE."""

    def __init__(self, obs_dim: int, out_dim: int, task: str = "regression", width: int = 32,
                 state_dim: int = 16, n_layers: int = 1, n_heads: int = 1, dropout: float = 0.0,
                 time_scale: float = 1.0, causal: bool = False, skip: bool = True, obs_var: float = 0.01):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.obs_var, self.skip = task, obs_var, skip
        self.encoder = ObservationEncoder(obs_dim, width, n_layers, n_heads, dropout, time_scale, causal)
        self.control = nn.Linear(width, state_dim)                       # alpha_k = B z_k
        self.emission = nn.Linear(state_dim, width)                      # potential g(u | X) = N(u; H X, R)
        self.aux_logvar = nn.Parameter(torch.zeros(width))
        self.decoder = mlp(state_dim + (width if skip else 0), width, out_dim)

    def latent_samples(self, z, alpha, dt, n_samples):  # -> samples [S,B,K,d], extras
        raise NotImplementedError

    def forward(self, times, values, mask, valid=None, n_samples: int = 1, t0: float = 0.0):
        valid = check_series(times, values, mask, valid)
        dt = time_gaps(times, valid, t0)
        z, u = self.encoder(times, values, mask, valid)
        alpha = self.control(z)
        x, extras = self.latent_samples(z, alpha, dt, n_samples, times=times, valid=valid, t0=t0)
        dec_in = torch.cat([x, z.expand(x.shape[0], *z.shape)], -1) if self.skip else x
        pred = self.decoder(dec_in)
        # -log g_k(u_k | X_k) at points where anything was observed (u detached: auxiliary observation)
        has_obs = (mask.sum(-1) > 0) & valid
        var = torch.exp(self.aux_logvar)
        pot = 0.5 * ((u.detach() - self.emission(x)) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        potential = (pot.mean(0) * has_obs).sum()
        control_cost = 0.5 * ((alpha ** 2).sum(-1) * dt).sum()
        return {"pred": pred, "alpha": alpha, "dt": dt, "valid": valid, "control_cost": control_cost,
                "potential": potential, **extras}

    def loss(self, out: dict, target, target_mask, weights: LossWeights):
        """Negative ELBO divided by the number of observed target entries; returns (loss, parts)."""
        n = target_mask.sum().clamp(min=1)
        nll = task_nll(out["pred"], target, target_mask, self.task, self.obs_var)
        total = (nll + weights.control * out["control_cost"] + weights.potential * out["potential"]) / n
        return total, {"task_nll": float(nll.detach() / n), "control": float(out["control_cost"].detach() / n),
                       "potential": float(out["potential"].detach() / n)}


class ACSSM(_ControlledLatentModel):
    """Amortized control + simulation-free linear latent SDE (closed-form moments, parallel scan)."""

    def __init__(self, obs_dim: int, out_dim: int, num_basis: int = 8, sigma: float = 1.0,
                 init_sigma: float = 1.0, parallel_scan: bool = True, **kw):
        super().__init__(obs_dim, out_dim, **kw)
        state_dim = self.control.out_features
        self.sde = LinearLatentSDE(state_dim, num_basis, sigma, init_sigma)
        self.parallel_scan = parallel_scan

    def latent_samples(self, z, alpha, dt, n_samples, **_):
        m, v = self.sde.moments(alpha, dt, parallel=self.parallel_scan)
        eps = torch.randn((n_samples, *m.shape), device=m.device, dtype=m.dtype)
        x = self.sde.to_state(m + v.sqrt() * eps)
        return x, {"latent_mean": self.sde.to_state(m), "latent_var_eig": v}


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
class _ControlledNeuralSDE(nn.Module):
    """Posterior SDE dX = (f_theta(X) + alpha(t)) dt + sigma dW for torchsde; alpha piecewise constant."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, state_dim: int, hidden: int, sigma: float):
        super().__init__()
        self.drift_net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, state_dim))
        self.sigma = sigma
        self.grid = self.alpha_on_grid = None

    def f(self, t, y):
        j = torch.searchsorted(self.grid, t.reshape(1).to(self.grid.dtype), right=True).clamp(max=len(self.grid) - 1)
        return self.drift_net(y) + self.alpha_on_grid[:, int(j)]

    def g(self, t, y):
        return torch.full_like(y, self.sigma)


class TorchsdeLatentSDE(_ControlledLatentModel):
    """Simulation-based latent SDE of the same latent size: neural prior drift, Euler-Maruyama in torchsde.

    Irregular series are solved on the union grid of the batch's times; alpha_k is applied on
    [t_{k-1}, t_k) of each series, the same control cost and potential as ACSSM.
    """

    def __init__(self, obs_dim: int, out_dim: int, sigma: float = 1.0, dt: float = 0.05, **kw):
        super().__init__(obs_dim, out_dim, **kw)
        state_dim = self.control.out_features
        self.sde = _ControlledNeuralSDE(state_dim, self.control.in_features, sigma)
        self.mean0 = nn.Parameter(torch.zeros(state_dim))
        self.logvar0 = nn.Parameter(torch.zeros(state_dim))
        self.step = dt

    def latent_samples(self, z, alpha, dt, n_samples, times=None, valid=None, t0=0.0):
        B, K, d = alpha.shape
        big = torch.finfo(times.dtype).max
        t_pad = torch.where(valid, times, torch.full_like(times, big))
        grid = torch.unique(torch.cat([times.new_tensor([t0]), times[valid]]))     # sorted, strictly incr.
        # alpha governing union interval [grid[j-1], grid[j]) = alpha at each series' next own time >= grid[j]
        nxt = torch.searchsorted(t_pad.contiguous(), grid[None].expand(B, -1).contiguous()).clamp(max=K - 1)
        alpha_grid = alpha.gather(1, nxt[..., None].expand(-1, -1, d))              # [B, J, d]
        self.sde.grid = grid
        self.sde.alpha_on_grid = alpha_grid.repeat(n_samples, 1, 1)
        y0 = self.mean0 + torch.exp(0.5 * self.logvar0) * torch.randn(n_samples * B, d, device=alpha.device)
        # Brownian motion seeded from torch's generator, so torch.manual_seed makes runs reproducible
        entropy = int(torch.randint(0, 2 ** 31 - 1, (1,)))
        bm = torchsde.BrownianInterval(float(grid[0]), float(grid[-1]), (n_samples * B, d), dtype=y0.dtype,
                                       device=y0.device, entropy=entropy)
        path = torchsde.sdeint(self.sde, y0, grid, method="euler", dt=self.step, bm=bm)  # [J, S*B, d]
        path = path.reshape(len(grid), n_samples, B, d).permute(1, 2, 0, 3)          # [S, B, J, d]
        idx = torch.searchsorted(grid, times.contiguous()).clamp(max=len(grid) - 1)  # [B, K]
        x = path.gather(2, idx[None, ..., None].expand(n_samples, -1, -1, d))
        return x, {"n_grid": len(grid)}


class GRUDelta(nn.Module):
    """GRU-Delta-t: a GRU over [y*mask, mask, dt_k] with an MLP read-out (deterministic)."""

    def __init__(self, obs_dim: int, out_dim: int, task: str = "regression", width: int = 32,
                 obs_var: float = 0.01, **_):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.obs_var = task, obs_var
        self.gru = nn.GRU(2 * obs_dim + 1, width, batch_first=True)
        self.decoder = mlp(width, width, out_dim)

    def forward(self, times, values, mask, valid=None, n_samples: int = 1, t0: float = 0.0):
        valid = check_series(times, values, mask, valid)
        dt = time_gaps(times, valid, t0)
        x = torch.where(mask > 0, torch.nan_to_num(values), torch.zeros_like(values))
        h, _ = self.gru(torch.cat([x, mask, dt[..., None]], -1))
        return {"pred": self.decoder(h)[None], "valid": valid}

    def loss(self, out, target, target_mask, weights: LossWeights | None = None):
        n = target_mask.sum().clamp(min=1)
        nll = task_nll(out["pred"], target, target_mask, self.task, self.obs_var)
        return nll / n, {"task_nll": float(nll.detach() / n)}


MODELS = {"acssm": ACSSM, "gru_dt": GRUDelta, "latent_sde": TorchsdeLatentSDE}
