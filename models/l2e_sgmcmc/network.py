"""A task's MLP with its weights as one flat row per chain: ``theta`` is [B, D] for B chains.

Every sampler here moves whole rows, so a step over all weights of all chains is a handful of tensor
operations, never a Python loop over layers or chains. ``tensor_ids`` names the layer tensor (W_l or b_l)
each weight belongs to, for the per-tensor feature normalisation of L2E.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "elu": F.elu}


@dataclass(frozen=True)
class MLPSpec:
    """Layer sizes (inputs, hidden..., classes) and the hidden activation."""

    sizes: tuple[int, ...]
    activation: str

    def __post_init__(self):
        if len(self.sizes) < 2 or self.activation not in ACTIVATIONS:
            raise ValueError(f"bad MLP spec {self}")

    @property
    def layers(self) -> list[tuple[int, int]]:
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def dim(self) -> int:
        return sum(i * o + o for i, o in self.layers)

    @property
    def n_tensors(self) -> int:
        return 2 * len(self.layers)

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mlp_logits(self, theta, x)

    def tensor_ids(self) -> torch.Tensor:
        """[D] index of the tensor (W_0, b_0, W_1, ...) holding each weight."""
        sizes = [n for i, o in self.layers for n in (i * o, o)]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def init(self, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """[batch, D] rows drawn like torch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        parts = []
        for i, o in self.layers:
            bound = 1.0 / math.sqrt(i)
            parts.append((torch.rand(batch, i * o + o, generator=generator) * 2 - 1) * bound)
        return torch.cat(parts, 1).to(device)


def forward(spec, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, C] of B weight rows on inputs x (shared [n, ...] or per row [B, n, ...]); ``spec`` is
    an :class:`MLPSpec` or any object with ``logits`` (e.g. ``convnets.ModuleSpec``)."""
    return spec.logits(theta, x)


def mlp_logits(spec: MLPSpec, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b = theta.shape[0]
    h = x if x.dim() == 3 else x.unsqueeze(0).expand(b, *x.shape)
    act = ACTIVATIONS[spec.activation]
    offset = 0
    for k, (i, o) in enumerate(spec.layers):
        w = theta[:, offset:offset + i * o].view(b, i, o)
        bias = theta[:, offset + i * o:offset + i * o + o].unsqueeze(1)
        offset += i * o + o
        h = torch.baddbmm(bias, h, w)
        if k < len(spec.layers) - 1:
            h = act(h)
    return h


def nll_per_row(spec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean NLL [B] of every row on (x, y) (y [n] shared or [B, n] per row)."""
    logits = forward(spec, theta, x)
    y = y if y.dim() == 2 else y.unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def loss_and_grad(spec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """(mean minibatch NLL [B], its gradient [B, D]): rows are independent, so the gradient of the sum
    over rows is every row's own gradient."""
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        loss = nll_per_row(spec, theta, x, y)
        (grad,) = torch.autograd.grad(loss.sum(), theta)
    return loss.detach(), grad


@torch.no_grad()
def probabilities(spec, theta: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Softmax predictions [B, n, C] of B rows (in chunks of rows to bound memory)."""
    return torch.cat([torch.softmax(forward(spec, theta[i:i + chunk], x), -1)
                      for i in range(0, theta.shape[0], chunk)])
