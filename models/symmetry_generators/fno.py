"""A 1-D Fourier neural operator (Li et al. 2021) for autoregressive KdV rollout, as LPSDA uses it.

Input: the last ``time_history`` frames u(t - h + 1 .. t, x) on the periodic grid, plus the position
(cos 2 pi x / L, sin 2 pi x / L) (LPSDA feeds the grid too, so the model is not translation-equivariant
and an x-translation augmentation is not a no-op). A pointwise lift to ``width`` channels, ``layers``
Fourier layers

    v <- GELU( W v + F^-1[ R_k . F[v]_k ]_{k < modes} )      (no GELU after the last layer)

with complex weights R_k (width x width) on the lowest ``modes`` wavenumbers, then a pointwise
projection to the next ``time_future`` frames. Rollout feeds its predictions back in chunks.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SpectralConv1d(nn.Module):
    """v -> F^-1[ R_k F[v]_k ] on the lowest ``modes`` rfft wavenumbers (the rest set to zero)."""

    def __init__(self, channels: int, modes: int):
        super().__init__()
        self.modes = modes
        scale = 1 / channels
        self.weight = nn.Parameter(scale * torch.randn(channels, channels, modes, dtype=torch.cfloat))

    def forward(self, v: torch.Tensor) -> torch.Tensor:          # v (batch, channels, nx)
        nx = v.shape[-1]
        coef = torch.fft.rfft(v)
        modes = min(self.modes, coef.shape[-1])
        out = torch.zeros_like(coef)
        out[..., :modes] = torch.einsum("bik,iok->bok", coef[..., :modes], self.weight[..., :modes])
        return torch.fft.irfft(out, n=nx)


class FNO1d(nn.Module):
    """u history (batch, time_history, nx) -> next frames (batch, time_future, nx)."""

    def __init__(self, time_history: int, time_future: int, width: int, modes: int, layers: int):
        super().__init__()
        self.time_history, self.time_future = time_history, time_future
        self.lift = nn.Linear(time_history + 2, width)
        self.spectral = nn.ModuleList(SpectralConv1d(width, modes) for _ in range(layers))
        self.pointwise = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(layers))
        self.project = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, time_future))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        batch, _, nx = history.shape
        angle = 2 * math.pi * torch.arange(nx, dtype=history.dtype, device=history.device) / nx
        position = torch.stack([angle.cos(), angle.sin()]).expand(batch, 2, nx)
        v = self.lift(torch.cat([history, position], dim=1).transpose(1, 2)).transpose(1, 2)
        for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise)):
            v = spectral(v) + pointwise(v)
            if i < len(self.spectral) - 1:
                v = nn.functional.gelu(v)
        return self.project(v.transpose(1, 2)).transpose(1, 2)


@torch.no_grad()
def rollout(model: FNO1d, u: torch.Tensor) -> torch.Tensor:
    """Unrolled prediction of trajectories u (n, nt, nx) from their first ``time_history`` frames:
    predictions of frames h .. h + c * f - 1 (c whole chunks of f), fed back chunk by chunk."""
    h, f = model.time_history, model.time_future
    chunks = (u.shape[1] - h) // f
    history, out = u[:, :h], []
    for _ in range(chunks):
        pred = model(history)
        out.append(pred)
        history = torch.cat([history, pred], dim=1)[:, -h:]
    return torch.cat(out, dim=1)


def rollout_nmse(model: FNO1d, u: torch.Tensor) -> torch.Tensor:
    """Per trajectory: the mean over chunks of MSE / mean(label^2) of the unrolled prediction
    (LPSDA's normalised rollout loss, averaged instead of summed over chunks)."""
    pred = rollout(model, u)
    f = model.time_future
    labels = u[:, model.time_history:model.time_history + pred.shape[1]]
    n, steps, nx = pred.shape
    err = ((pred - labels) ** 2).reshape(n, steps // f, f * nx).mean(-1)
    norm = (labels ** 2).reshape(n, steps // f, f * nx).mean(-1)
    return (err / norm).mean(-1)


def valid_starts(valid_rows: torch.Tensor, window: int) -> torch.Tensor:
    """(..., nt) valid rows -> (..., nt - window + 1): windows of ``window`` valid frames."""
    runs = valid_rows.float().unfold(-1, window, 1)
    return runs.min(dim=-1).values > 0


def train_fno(model: FNO1d, pool: torch.Tensor, valid_rows: torch.Tensor, steps: int, batch: int,
              lr: float, p_original: float, generator: torch.Generator, on_step=None) -> FNO1d:
    """AdamW (cosine schedule) on the one-chunk MSE of windows drawn from ``pool`` (n, 1 + copies, nt, nx),
    copy 0 being the original: with probability ``p_original`` the original, else a random copy;
    the window start uniform among the copy's windows of valid frames (LPSDA's sampling). The pool may
    live on the model's device; sampling runs on the CPU generator."""
    n, copies, nt, nx = pool.shape
    window = model.time_history + model.time_future
    starts = valid_starts(valid_rows, window).float()                      # (n, copies, nt - w + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        traj = torch.randint(0, n, (batch,), generator=generator)
        copy = torch.randint(1, max(copies, 2), (batch,), generator=generator)
        use_original = torch.rand(batch, generator=generator) < p_original
        copy = torch.where(use_original | (copies == 1), torch.zeros_like(copy), copy)
        start = torch.multinomial(starts[traj, copy], 1, generator=generator)       # (batch, 1)
        frames = start + torch.arange(window)[None, :]
        index = (traj[:, None].to(pool.device), copy[:, None].to(pool.device), frames.to(pool.device))
        windows = pool[index]                                                        # (batch, w, nx)
        pred = model(windows[:, :model.time_history])
        loss = ((pred - windows[:, model.time_history:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step, float(loss.detach()))
    return model
