"""Stage 2 (and each stage-1 proxy run): fine-tuning at a constant learning rate, collecting checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bo_fusion.fusion import ClassMetric, TextBatches, evaluate, logits_of


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class FinetuneResult:
    checkpoints: list[dict[str, Tensor]]
    checkpoint_steps: list[int]
    val_curve: list[tuple[int, float, float]]  # (step, metric, loss)
    best_val_metric: float


def finetune_collect(
    model: nn.Module,
    train: TextBatches,
    val: TextBatches | None,
    *,
    metric: ClassMetric,
    lr: float,
    batch_size: int,
    steps: int,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    eval_every: int = 0,
    checkpoint_steps: Sequence[int] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """AdamW, linear warm-up then constant learning rate (the paper's schedule), shuffled mini-batches
    from a seeded generator; evaluates `val` with `metric` every `eval_every` steps and keeps the
    trainable parameters at each step in `checkpoint_steps`."""
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError("steps, batch_size and lr must be positive")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    order = torch.randperm(n, generator=gen)
    pos = 0
    keep = set(checkpoint_steps)
    result = FinetuneResult([], [], [], -math.inf)
    model.train()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size].to(train.labels.device)
        pos += batch_size
        out = model(train.inputs[idx], train.attention_mask[idx])
        loss = F.cross_entropy(logits_of(out).float(), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
        if val is not None and eval_every and (step % eval_every == 0 or step == steps):
            f1, vloss = evaluate(model, val, metric)
            result.val_curve.append((step, f1, vloss))
            result.best_val_metric = max(result.best_val_metric, f1)
        if step in keep:
            result.checkpoints.append(trainable_state(model))
            result.checkpoint_steps.append(step)
    return result


def checkpoint_window(reference_step: int, k: int, start: float, end: float) -> list[int]:
    """K evenly spaced steps from start·reference to end·reference (the paper: 0.5× to 2× the
    early-stopping step, every 50 steps)."""
    if k < 2:
        raise ValueError(f"need K >= 2 checkpoints, got {k}")
    if not 0 < start < end:
        raise ValueError("need 0 < start < end for the checkpoint window")
    lo, hi = start * reference_step, end * reference_step
    steps = sorted({max(1, round(lo + i * (hi - lo) / (k - 1))) for i in range(k)})
    if len(steps) < k:
        raise ValueError(f"window {lo:.0f}..{hi:.0f} too short for {k} distinct checkpoints")
    return steps
