"""Bridge matching with iterative Markovian fitting (IDBM), and the samplers.

Training (notes section 2, items 3 and 5): for a coupling (x_0, x_1), draw t ~ U[0, t_max) and x_t from
the reference bridge, and regress the network's prediction on the endpoint,
  L = E || f_theta(x_t, t) - x_1 ||^2,
which matches the h-transform drift because that drift is affine in x_1. Iteration 1 uses the
independent coupling; iteration i > 1 trains the direction opposite to iteration i - 1 on couplings
made by simulating the other direction's EMA network from real data (a cache of paths refreshed every
``cache_refresh`` steps). Odd iterations train the forward network (pi_0 -> pi_1), even ones the
backward network (pi_1 -> pi_0, the same bridge with the endpoints swapped: an OU bridge reversed in
time is the OU bridge between the swapped endpoints). Each network keeps its weights across its
iterations (warm start). ``train_idbm`` also continues iteration 1 alone for the chain's total steps:
the baseline at equal total training steps.

Sampling: from x_0, at each step the network predicts the endpoint and the state moves to the next
time either by the exact per-mode bridge step (stable for any a dt) or by Euler-Maruyama on the
h-transformed SDE (unstable when max a dt > 2). The last exact step lands on the predicted endpoint,
so the scored output, the final state, equals the prediction made at the last step's start.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .operator import OperatorTransformer, grid_coordinates
from .spectral import SpectralOU


@dataclass(frozen=True)
class TrainConfig:
    iterations: int           # odd: the chain ends on the forward network
    steps_per_iteration: int
    batch_size: int
    lr: float
    ema_decay: float
    grad_clip: float
    sampling_steps: int       # steps of the sampler that builds couplings
    cache_size: int           # paths simulated per cache refresh
    cache_refresh: int        # training steps between refreshes
    query_points: int         # output points per example in the loss (0: all; Perceiver-IO subsampling)


def to_tokens(f: torch.Tensor, dim: int) -> torch.Tensor:
    """Grid values [B, *shape] (1-D) or [B, C, *shape] (images) -> tokens [B, N, C]."""
    b = f.shape[0]
    if f.ndim == dim + 1:
        return f.reshape(b, -1, 1)
    return f.reshape(b, f.shape[1], -1).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tokens.shape[-1] == 1 and like.ndim != tokens.ndim + 1:
        return tokens.reshape(like.shape)
    return tokens.transpose(1, 2).reshape(like.shape)


class EndpointPredictor:
    """Grid values in, predicted endpoint out (same layout), on any grid."""

    def __init__(self, net: OperatorTransformer):
        self.net = net
        self.dim = net.cfg.dim
        self._coords: dict[tuple, torch.Tensor] = {}

    def coords(self, shape: tuple[int, ...], device) -> torch.Tensor:
        key = (tuple(shape), str(device))
        if key not in self._coords:
            self._coords[key] = grid_coordinates(tuple(shape)).to(device)
        return self._coords[key]

    def __call__(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(f.shape[-self.dim:])
        out = self.net(to_tokens(f.float(), self.dim), self.coords(shape, f.device), t)
        return from_tokens(out, f).to(f.dtype)


@torch.no_grad()
def sample(predict: Callable, ou: SpectralOU, f0: torch.Tensor, steps: int, sampler: str = "exact",
           batch_size: int = 256, return_path: bool = False):
    """Simulate the learned bridge from f0 (grid values on ou.shape); the final state at t = 1."""
    if sampler not in ("exact", "euler_maruyama"):
        raise ValueError(f"sampler must be 'exact' or 'euler_maruyama', got {sampler!r}")
    step_fn = ou.exact_step if sampler == "exact" else ou.euler_maruyama_step
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    finals, paths = [], []
    for chunk in f0.split(batch_size):
        f, path = chunk, [chunk]
        for t, t_next in zip(times[:-1], times[1:]):
            f1_hat = predict(f, torch.full((f.shape[0],), t, device=f.device))
            f = step_fn(f, f1_hat, t, t_next)
            if return_path:
                path.append(f)
        finals.append(f)
        paths.append(torch.stack(path, dim=1) if return_path else None)
    final = torch.cat(finals)
    return (final, torch.cat(paths)) if return_path else final


class Direction:
    """One direction's network, its EMA copy and optimiser (kept across that direction's iterations)."""

    def __init__(self, net: OperatorTransformer, cfg: TrainConfig):
        self.net, self.cfg = net, cfg
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        self.predict = EndpointPredictor(net)
        self.steps = 0

    def ema_predictor(self) -> EndpointPredictor:
        return EndpointPredictor(self.ema.module)

    def train_step(self, ou: SpectralOU, start: torch.Tensor, end: torch.Tensor) -> float:
        """One bridge-matching step on the coupling (start, end)."""
        cfg = self.cfg
        b = start.shape[0]
        t_max = 1.0 - 0.5 / cfg.sampling_steps
        t = torch.rand(b, device=start.device) * t_max
        ft = ou.bridge_sample(start.double(), end.double(), t).float()
        dim = self.predict.dim
        coords = self.predict.coords(tuple(start.shape[-dim:]), start.device)
        target = to_tokens(end, dim)
        idx = None
        if 0 < cfg.query_points < coords.shape[0]:
            idx = torch.randperm(coords.shape[0], device=start.device)[:cfg.query_points]
            target = target[:, idx]
        pred = self.net(to_tokens(ft, dim), coords, t, idx)
        loss = torch.mean((pred - target) ** 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self.ema.update_parameters(self.net)
        self.steps += 1
        return float(loss.detach())


def _batches(data: torch.Tensor, size: int):
    return data[torch.randint(0, data.shape[0], (size,), device=data.device)]


def run_iteration(direction: Direction, ou: SpectralOU, source: torch.Tensor, target: torch.Tensor,
                  cfg: TrainConfig, steps: int, coupling_from: Direction | None,
                  on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``direction`` from ``source`` to ``target`` for ``steps`` steps. With ``coupling_from`` (the
    opposite direction), pairs are (simulated source from real target, real target); else independent."""
    losses = []
    cache = None
    for step in range(steps):
        if coupling_from is None:
            start, end = _batches(source, cfg.batch_size), _batches(target, cfg.batch_size)
        else:
            if cache is None or step % cfg.cache_refresh == 0:
                real = _batches(target, cfg.cache_size)
                made = sample(coupling_from.ema_predictor(), ou, real.double(), cfg.sampling_steps).float()
                cache = (made, real)
            idx = torch.randint(0, cfg.cache_size, (cfg.batch_size,), device=source.device)
            start, end = cache[0][idx], cache[1][idx]
        losses.append(direction.train_step(ou, start, end))
        if on_step is not None:
            on_step(direction.steps, losses[-1])
    return losses


def train_idbm(make_net: Callable[[], OperatorTransformer], ou: SpectralOU, pi0: torch.Tensor,
               pi1: torch.Tensor, cfg: TrainConfig, progress: Callable | None = None) -> dict:
    """The IDBM chain (forward, backward, forward, ...) and the iteration-1 baseline at equal total steps.

    Returns EMA state dicts ``first`` (forward after iteration 1), ``first_equal_steps`` (iteration 1
    continued for the chain's total steps), ``final`` (forward after the last iteration), ``backward``
    (the last backward network), and the loss curves."""
    if cfg.iterations % 2 == 0:
        raise ValueError("iterations must be odd so that the chain ends on the forward network")
    forward, backward = Direction(make_net(), cfg), Direction(make_net(), cfg)
    curves: dict[str, list[float]] = {}
    s = cfg.steps_per_iteration
    curves["iteration1"] = run_iteration(forward, ou, pi0, pi1, cfg, s, None, progress)
    states = {"first": copy.deepcopy(forward.ema.module.state_dict())}
    baseline = copy.deepcopy(forward)
    curves["first_continued"] = run_iteration(baseline, ou, pi0, pi1, cfg, (cfg.iterations - 1) * s, None,
                                              progress)
    states["first_equal_steps"] = baseline.ema.module.state_dict()
    for it in range(2, cfg.iterations + 1):
        if it % 2 == 0:  # backward: from simulated pi_1 samples to the real pi_0 they came from
            curves[f"iteration{it}"] = run_iteration(backward, ou, pi1, pi0, cfg, s, forward, progress)
        else:
            curves[f"iteration{it}"] = run_iteration(forward, ou, pi0, pi1, cfg, s, backward, progress)
    states["final"] = forward.ema.module.state_dict()
    states["backward"] = backward.ema.module.state_dict()
    return {"states": states, "curves": curves}
