"""Training with the ELBO-style objective CE + lambda * regulariser (the KL of q(u | f) to the full group for
rotations, the hue-shift regulariser for colours), batch-norm statistics recomputed on the training set, and
predictions with the learned subsets (theta per rotation layer, kept hue fraction per colour layer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import MaskedBatchNorm


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    lr_theta: float           # learning rate of theta / keep-probability parameters (tied to the step budget)
    weight_decay: float
    lam: float                # weight of the regulariser (the KL for rotations)
    temperature_start: float  # RelaxedBernoulli temperature, annealed linearly ...
    temperature_end: float    # ... to this value over training


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
        on_epoch: Callable[[int, dict], None] | None = None) -> list[float]:
    """Adam on CE + lam * model.regulariser(); returns the per-step training loss."""
    theta = {id(p) for p in model.theta_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in theta], "lr": cfg.lr,
               "weight_decay": cfg.weight_decay}]
    if theta:
        groups.append({"params": model.theta_parameters(), "lr": cfg.lr_theta, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups)
    n = len(y)
    total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, cfg.batch_size):
            if hasattr(model, "set_temperature"):
                frac = len(losses) / max(total - 1, 1)
                model.set_temperature(cfg.temperature_start + frac * (cfg.temperature_end - cfg.temperature_start))
            idx = perm[i:i + cfg.batch_size]
            ce = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = ce + cfg.lam * model.regulariser()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(ce.detach()))
        if on_epoch is not None:
            on_epoch(epoch, {"loss": sum(losses[-((n + cfg.batch_size - 1) // cfg.batch_size):])
                             / ((n + cfg.batch_size - 1) // cfg.batch_size)})
    return losses


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Running statistics of every masked batch norm as the plain average over one training-set pass (in
    training mode, so the subsets are sampled as in training)."""
    norms = [m for m in model.modules() if isinstance(m, MaskedBatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.cumulative = True
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for m in norms:
        m.cumulative = False
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """probs [n, classes] and the learned subset per input: theta [n, layers] (rotations) or kept hue
    fraction [n, layers] (colours). Evaluation mode: deterministic subsets (offset 0)."""
    model.eval()
    probs, subset = [], []
    for i in range(0, len(x), batch_size):
        probs.append(torch.softmax(model(x[i:i + batch_size]), -1))
        subset.append(torch.stack(model.thetas, -1) if hasattr(model, "thetas") else model.kept)
    return {"probs": torch.cat(probs).cpu(), "subset": torch.cat(subset).cpu()}


@torch.no_grad()
def invariance_error(model: nn.Module, x: torch.Tensor) -> float:
    """max |logits(rot90^k x) - logits(x)| over k = 1, 2, 3 (0 up to float error for an exact C_N G-CNN)."""
    model.eval()
    base = model(x)
    return max(float((model(torch.rot90(x, k, dims=(-2, -1))) - base).abs().max()) for k in (1, 2, 3))
