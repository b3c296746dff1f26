"""ACSSM and its baselines: the observation encoder, the amortized control, the decoder and the ELBO.

ACSSM uses the simulation-free dynamics of ``models/acssm/sde.py``; ``TorchsdeLatentSDE`` shares its
encoder, control, decoder and ELBO but solves a neural prior drift step by step with torchsde;
``GRUDelta`` is a GRU over time-gap inputs. See ``models/acssm/__init__.py`` for the data flow."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchsde
from torch import nn

from models.acssm.sde import LinearLatentSDE, check_series, time_gaps

TASKS = ("regression", "classification")


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


class ConvEmbedding(nn.Module):
    """The paper's image encoder for pendulum frames: each time point's image and its mask, as two
    channel groups [y*mask, mask] (like the MLP's input), through a small conv net -> [.., width].

    Input [B, K, C*H*W] (flattened channels-first frames, as stored); two conv blocks (5x5 then 3x3
    stride 2, ReLU, max-pooling; the pooled grid is at most 3x3 so any frame of >= 4x4 works), then an
    MLP to ``width``."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, channels: int = 12):
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if min(h, w) < 4:
            raise ValueError(f"image frames must be at least 4x4, got {h}x{w}")
        self.image_shape = (c, h, w)
        self.conv = nn.Sequential(
            nn.Conv2d(2 * c, channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 9, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x: [B, K, 2*C*H*W] = [y*mask, mask]
        c, h, w = self.image_shape
        lead = x.shape[:-1]
        frames = x.reshape(-1, 2 * c, h, w)
        return self.head(self.conv(frames)).reshape(*lead, -1)


class ObservationEncoder(nn.Module):
    """z_k = GRU(Transformer(embed([y*mask, mask]) + PE(t)))_k; ``causal`` = past-only ("history") attention.

    ``embed`` is an MLP on the flattened observation, or ``ConvEmbedding`` when ``image_shape`` (C, H, W)
    is given (observations are then flattened images)."""

    def __init__(self, obs_dim: int, width: int, n_layers: int = 1, n_heads: int = 1, dropout: float = 0.0,
                 time_scale: float = 1.0, causal: bool = False, image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.width, self.time_scale, self.causal = width, time_scale, causal
        if image_shape is not None:
            if math.prod(image_shape) != obs_dim:
                raise ValueError(f"image_shape {tuple(image_shape)} does not hold obs_dim {obs_dim} values")
            self.embed = ConvEmbedding(image_shape, width)
        else:
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
# Shared heads and the ELBO
# --------------------------------------------------------------------------------------------------
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, out))


@dataclass
class LossWeights:
    """Weights of the two non-task ELBO terms (the official code uses 1e-6 and 1e-8; set in params.yaml)."""
    control: float
    potential: float


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
                 time_scale: float = 1.0, causal: bool = False, skip: bool = True, obs_var: float = 0.01,
                 image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.obs_var, self.skip = task, obs_var, skip
        self.encoder = ObservationEncoder(obs_dim, width, n_layers, n_heads, dropout, time_scale, causal,
                                          image_shape)
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
