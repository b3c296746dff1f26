"""Stage 2 (and each stage-1 proxy run): fine-tuning at a constant learning rate, collecting checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bo_fusion.fusion import ClassMetric, TextBatches, evaluate, logits_of


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class ConstantLrTrainer:
    """AdamW (β = 0.9/0.98, eps 1e-6, the paper's RoBERTa settings), linear warm-up then a constant
    learning rate, shuffled mini-batches from a generator seeded with `seed`. The trajectory depends
    only on the seed and the hyperparameters, never on when training stops, so a re-run with the same
    seed passes through the same weights (the paper's stage 2 re-trains to collect its checkpoints)."""

    def __init__(self, model: nn.Module, train: TextBatches, *, lr: float, batch_size: int, warmup_steps: int,
                 weight_decay: float, seed: int):
        if batch_size <= 0 or lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.model, self.train, self.batch_size = model, train, batch_size
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.step = torch.randperm(len(train), generator=self.gen), 0, 0
        model.train()

    def advance(self) -> float:
        """One optimiser step; returns the mini-batch loss."""
        if self.pos + self.batch_size > len(self.train):
            self.order, self.pos = torch.randperm(len(self.train), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size].to(self.train.labels.device)
        self.pos += self.batch_size
        mask = self.train.attention_mask[idx]
        end = int(mask.sum(-1).max())  # right padding: trailing columns change no logit, ~30% of the tokens
        out = self.model(self.train.inputs[idx][:, :end], mask[:, :end])
        loss = F.cross_entropy(logits_of(out).float(), self.train.labels[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        return loss.item()


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
    """A fixed number of steps of `ConstantLrTrainer` (a stage-1 proxy run); evaluates `val` with
    `metric` every `eval_every` steps and keeps the trainable parameters at each step in `checkpoint_steps`."""
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError("steps, batch_size and lr must be positive")
    trainer = ConstantLrTrainer(model, train, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
                                weight_decay=weight_decay, seed=seed)
    keep = set(checkpoint_steps)
    result = FinetuneResult([], [], [], -math.inf)
    for step in range(1, steps + 1):
        loss = trainer.advance()
        if on_step is not None:
            on_step(step, loss)
        if val is not None and eval_every and (step % eval_every == 0 or step == steps):
            f1, vloss = evaluate(model, val, metric)
            result.val_curve.append((step, f1, vloss))
            result.best_val_metric = max(result.best_val_metric, f1)
        if step in keep:
            result.checkpoints.append(trainable_state(model))
            result.checkpoint_steps.append(step)
    return result


@dataclass
class EarlyStoppingResult:
    best_step: int                  # the early-stopping step: the best val metric on the evaluation grid
    best_val_metric: float
    stop_step: int                  # where the patience ran out (or max_steps)
    last_step: int                  # the last step trained (>= end of the window, unless max_steps cut it)
    window: tuple[float, float]     # [start, end] x best_step, in steps
    checkpoints: list[dict[str, Tensor]]
    checkpoint_steps: list[int]
    val_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, metric, loss) until stop_step
    truncated: bool = False         # max_steps ended training before the window's end


def pick_evenly(candidates: Sequence[int], k: int) -> list[int]:
    """K of the sorted `candidates`, evenly spaced by position (first and last included); all of them
    when there are fewer than K."""
    c = sorted(candidates)
    if len(c) <= k:
        return c
    return [c[round(i * (len(c) - 1) / (k - 1))] for i in range(k)]


def finetune_early_stopping(
    model: nn.Module,
    train: TextBatches,
    val: TextBatches,
    *,
    metric: ClassMetric,
    lr: float,
    batch_size: int,
    max_steps: int,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    eval_every: int,
    patience: int,
    save_every: int,
    n_checkpoints: int,
    window: tuple[float, float],
    on_step: Callable[[int, float], None] | None = None,
) -> EarlyStoppingResult:
    """The paper's stage 2: early stopping on the validation metric (evaluated every `eval_every` steps,
    stopped after `patience` evaluations without improvement) finds best_step; the fusion members are
    K checkpoints evenly spaced from window[0]·best_step to window[1]·best_step on the grid of every
    `save_every` steps, at the constant learning rate.

    The paper re-trains from the same seed to collect them; the trajectory of `ConstantLrTrainer` does not
    depend on when training stops, so one run that keeps the grid's checkpoints from window[0]·(best step
    so far) on and trains on to window[1]·best_step gives the same checkpoints at less cost."""
    if min(max_steps, eval_every, patience, save_every) <= 0 or n_checkpoints < 2:
        raise ValueError("max_steps, eval_every, patience, save_every must be positive and n_checkpoints >= 2")
    if not 0 < window[0] < window[1]:
        raise ValueError("window must be [start, end] with 0 < start < end")
    trainer = ConstantLrTrainer(model, train, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
                                weight_decay=weight_decay, seed=seed)
    snapshots: dict[int, dict[str, Tensor]] = {}
    curve: list[tuple[int, float, float]] = []
    best, best_step, since_best, stop_step = -math.inf, 0, 0, None
    for step in range(1, max_steps + 1):
        loss = trainer.advance()
        if on_step is not None:
            on_step(step, loss)
        if step % save_every == 0:  # kept in CPU memory
            snapshots[step] = {n: t.cpu() for n, t in trainable_state(model).items()}
        if stop_step is None and step % eval_every == 0:
            f1, vloss = evaluate(model, val, metric)
            curve.append((step, f1, vloss))
            if f1 > best:
                best, best_step, since_best = f1, step, 0
            else:
                since_best += 1
            for s in [s for s in snapshots if s < window[0] * best_step]:  # best_step only grows: not needed
                del snapshots[s]
            if since_best >= patience:
                stop_step = step
        if stop_step is not None and step >= window[1] * best_step:
            break
    if best_step == 0:
        raise ValueError(f"max_steps={max_steps} ends before the first evaluation (eval_every={eval_every})")
    lo, hi = window[0] * best_step, window[1] * best_step
    steps = pick_evenly([s for s in snapshots if lo <= s <= hi], n_checkpoints)
    if len(steps) < 2:
        raise ValueError(f"the window {lo:.0f}..{hi:.0f} holds {len(steps)} checkpoint(s) on the grid of every "
                         f"{save_every} steps: lower save_every")
    return EarlyStoppingResult(best_step=best_step, best_val_metric=best, stop_step=stop_step or step,
                               last_step=step, window=(lo, hi), checkpoints=[snapshots[s] for s in steps],
                               checkpoint_steps=steps, val_curve=curve, truncated=step < hi)
