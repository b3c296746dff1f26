"""Time per sampler step, samplers interleaved in one process (order rotated every repeat)."""
from __future__ import annotations

import time

import torch

from .network import MLPSpec
from .sampler import Dynamics, run_chains


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_per_step(spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor, dyn: Dynamics,
                  kinetics: dict, steps: int, batch_size: int, repeats: int, seed: int) -> dict[str, list[float]]:
    """Seconds per step of every named kinetic (same chains, data, batch and dynamics), ``repeats``
    timed runs each after one untimed warm-up run; runs of different samplers alternate."""
    names = list(kinetics)
    out: dict[str, list[float]] = {n: [] for n in names}
    device = theta0.device
    for rep in range(-1, repeats):
        order = names[rep % len(names):] + names[:rep % len(names)] if rep >= 0 else names
        for name in order:
            gen = torch.Generator(device=device).manual_seed(seed + max(rep, 0))
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                run_chains(spec, x, y, theta0, kinetics[name], dyn, steps, batch_size, [], gen)
            _sync(device)
            if rep >= 0:
                out[name].append((time.perf_counter() - start) / steps)
    return out
