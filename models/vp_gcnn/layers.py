"""Batch norm over group feature maps [B, C, N, H, W] whose masked group elements (mask [B, N] = 0) are
left out of the statistics and stay zero (masked rotations or hue shifts are not features)."""
from __future__ import annotations

import torch
from torch import nn


class MaskedBatchNorm(nn.Module):
    """Per-channel normalisation with statistics over batch, kept group elements and space.

    ``cumulative = True`` makes the running statistics an equal-weight average of the batches seen
    (used to recompute them on the training set before evaluation)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps, self.cumulative = momentum, eps, False
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.batches.zero_()

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :, None, None].to(f.dtype)  # [B, 1, N, 1, 1]
        if self.training:
            count = m.sum() * f.shape[-1] * f.shape[-2]
            mean = (f * m).sum(dim=(0, 2, 3, 4)) / count
            var = (((f - mean[None, :, None, None, None]) ** 2) * m).sum(dim=(0, 2, 3, 4)) / count
            with torch.no_grad():
                w = 1.0 / (self.batches.item() + 1) if self.cumulative else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - w).add_(w * mean.detach())
                self.running_var.mul_(1 - w).add_(w * unbiased.detach())
                self.batches += 1
        else:
            mean, var = self.running_mean, self.running_var
        shape = (1, -1, 1, 1, 1)
        out = (f - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return (out * self.weight.view(shape) + self.bias.view(shape)) * m


def masked_mean(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of [B, C, N, H, W] over space and kept group elements -> [B, C] (global pooling)."""
    m = mask[:, None, :].to(f.dtype)
    return (f.mean(dim=(-1, -2)) * m).sum(-1) / m.sum(-1).clamp(min=1e-6)


def group_max_pool(f: torch.Tensor) -> torch.Tensor:
    """2x2 spatial max pooling of [B, C, N, H, W]."""
    b, c, n, h, w = f.shape
    return nn.functional.max_pool2d(f.reshape(b, c * n, h, w), 2).reshape(b, c, n, h // 2, w // 2)
