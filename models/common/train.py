"""A plain supervised training loop for small classifiers (mini-batch SGD with momentum)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                   batch_size: int, weight_decay: float = 0.0, momentum: float = 0.9,
                   generator: torch.Generator | None = None,
                   lr_at: Callable[[int, int], float] | None = None,
                   on_step: Callable[[int, nn.Module], None] | None = None,
                   on_epoch: Callable[[int, float], None] | None = None,
                   progress: Callable[[Iterable], Iterable] = lambda it: it) -> nn.Module:
    """Cross-entropy training. ``lr_at(step, total_steps)`` overrides the constant ``lr``;
    ``on_step(step, model)`` runs after each update (snapshots, SWAG moments)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(y)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    step = 0
    for epoch in progress(range(epochs)):
        model.train()
        perm = torch.randperm(n, generator=generator)
        running = 0.0
        for i in range(0, n, batch_size):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total)
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += loss.item() * len(idx)
            if on_step is not None:
                on_step(step, model)
        if on_epoch is not None:
            on_epoch(epoch, running / n)
    model.eval()
    return model
