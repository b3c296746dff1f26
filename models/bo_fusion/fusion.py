"""Fusion weights, fused parameters, evaluation of a (fused) classifier, greedy soup (Sec. 4.3, Sec. 5)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (predicted labels, true labels, number of classes) -> score; the stages pass tasks.metrics.macro_f1
ClassMetric = Callable[[np.ndarray, np.ndarray, int], float]


def simplex_weights(alpha: Tensor) -> Tensor:
    """w = α / Σα over the last dimension; α = 0 (undefined ratio) falls back to uniform weights."""
    if torch.any(alpha < 0):
        raise ValueError("fusion coefficients alpha must be non-negative")
    total = alpha.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(alpha, 1.0 / alpha.shape[-1])
    return torch.where(total > 0, alpha / total.clamp_min(torch.finfo(alpha.dtype).tiny), uniform)


def stack_checkpoints(checkpoints: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """K state dicts (same keys and shapes) -> one dict of tensors with a leading K axis."""
    if len(checkpoints) < 2:
        raise ValueError(f"fusion needs at least K=2 checkpoints, got {len(checkpoints)}")
    keys = list(checkpoints[0])
    for i, ckpt in enumerate(checkpoints[1:], start=1):
        if list(ckpt) != keys:
            raise ValueError(f"checkpoint {i} has different parameter names than checkpoint 0")
    return {k: torch.stack([c[k].detach().float() for c in checkpoints]) for k in keys}


def fuse_parameters(stacked: dict[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
    """θ(w) = Σ_k w_k θ_k for every stacked tensor (weights: shape (K,), already on the simplex)."""
    out = {}
    for name, theta in stacked.items():
        if theta.shape[0] != weights.shape[0]:
            raise ValueError(f"{name}: {theta.shape[0]} checkpoints but {weights.shape[0]} weights")
        out[name] = torch.tensordot(weights.to(theta.device, theta.dtype), theta, dims=1)
    return out


@dataclass
class TextBatches:
    """A split: `inputs` (N, T) token ids, or (N, T, H) hidden states cached below the trained layers,
    `attention_mask` (N, T) and `labels` (N,). Models are called as `model(inputs, attention_mask)`."""

    inputs: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def chunks(self, batch_size: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        """Mini-batches of examples of similar length (sorted by length), each cut after its last
        non-padding column: trailing padding changes no logit, and it is ~30% of the tokens here."""
        order = torch.argsort(self.attention_mask.sum(-1), stable=True)
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            mask = self.attention_mask[idx]
            used = mask.any(0).nonzero()
            end = int(used.max()) + 1 if used.numel() else mask.shape[1]
            yield self.inputs[idx][:, :end], mask[:, :end], self.labels[idx]


def logits_of(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(model: nn.Module, data: TextBatches, metric: ClassMetric, params: dict[str, Tensor] | None = None,
             batch_size: int = 256) -> tuple[float, float]:
    """(metric, mean cross-entropy) of `model` on `data`, with `params` substituted when given."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, mask, y in data.chunks(batch_size):
        if params is None:
            out = model(x, mask)
        else:
            out = torch.func.functional_call(model, params, (x, mask), strict=False)
        logits.append(logits_of(out).float())
        labels.append(y)
    model.train(was_training)
    z, y = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(z, y).item()
    return metric(z.argmax(-1).cpu().numpy(), y.cpu().numpy(), z.shape[-1]), loss


class FusedClassifier:
    """Evaluates Σ_k w_k θ_k without reloading: the K checkpoints of the trainable parameters are stacked
    once; the fused tensors replace them in `model` through `torch.func.functional_call`."""

    def __init__(self, model: nn.Module, checkpoints: Sequence[dict[str, Tensor]], metric: ClassMetric):
        self.model = model
        self.metric = metric
        self.stacked = stack_checkpoints(checkpoints)
        self.k = len(checkpoints)
        names = dict(model.named_parameters())
        missing = [n for n in self.stacked if n not in names]
        if missing:
            raise ValueError(f"checkpoint parameters not in the model: {missing[:3]}")

    def params(self, weights: Tensor) -> dict[str, Tensor]:
        return fuse_parameters(self.stacked, weights)

    def evaluate(self, weights: Tensor, data: TextBatches, batch_size: int = 256) -> tuple[float, float]:
        return evaluate(self.model, data, self.metric, self.params(weights), batch_size)


def min_max_normalise(value: float, low: float, high: float) -> float:
    """(value − low) / (high − low); a zero range maps to value − low (no division by zero)."""
    span = high - low
    return (value - low) / span if span > 0 else value - low


def bomf_objectives(f1: float, loss: float, member_f1: Sequence[float], member_loss: Sequence[float]) -> list[float]:
    """BOMF's two objectives (Sec. 4.3), both maximised: the val metric and the NEGATIVE val loss, each
    min-max normalised over the K members, so on each objective the members' best scores 1 and their
    worst 0 (a fused model may leave [0, 1]); the reference point 0 is the members' worst corner."""
    return [min_max_normalise(f1, min(member_f1), max(member_f1)),
            min_max_normalise(-loss, -max(member_loss), -min(member_loss))]


def majority_metric(labels: Tensor, num_classes: int, metric: ClassMetric) -> float:
    """`metric` of the constant prediction of the most frequent class of `labels` (the floor to beat)."""
    y = labels.cpu().numpy()
    return metric(np.full_like(y, int(np.bincount(y, minlength=num_classes).argmax())), y, num_classes)


def greedy_soup(val_metric_of: Callable[[Tensor], float], member_metrics: Sequence[float]) -> tuple[Tensor, float]:
    """Greedy soup (Wortsman et al., 2022): visit members by decreasing validation metric; add one to the
    uniform soup when the soup's metric does not drop. Returns the soup's simplex weights and its
    validation metric."""
    k = len(member_metrics)
    if k < 2:
        raise ValueError("greedy soup needs K >= 2 members")
    order = sorted(range(k), key=lambda i: -member_metrics[i])
    chosen = [order[0]]
    best = member_metrics[order[0]]

    def weights(members: list[int]) -> Tensor:
        w = torch.zeros(k)
        w[members] = 1.0 / len(members)
        return w

    for i in order[1:]:
        score = val_metric_of(weights(chosen + [i]))
        if score >= best:
            chosen.append(i)
            best = score
    return weights(chosen), best
