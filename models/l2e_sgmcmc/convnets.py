"""Paper-scale task networks as flat weight rows: any nn.Module through ``torch.func.functional_call``
vmapped over the rows, the meta-training CNN family (width x depth x residual) and ResNet20-FRN-Swish.

``ModuleSpec`` offers what the samplers need from a task network (``dim``, ``n_tensors``,
``tensor_ids``, ``init``, ``logits``), so L2E and every baseline run unchanged on convolutional nets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap


class ModuleSpec:
    """A module's parameters flattened into one row per chain (buffers are not sampled)."""

    def __init__(self, build, seed: int = 0):
        torch.manual_seed(seed)
        self.build = build
        self.module = build()
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]
        self.sizes = [p.numel() for _, p in self.module.named_parameters()]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def n_tensors(self) -> int:
        return len(self.sizes)

    def tensor_ids(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    def init(self, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Rows from the module's own initialisation, one fresh module per row."""
        rows = []
        for _ in range(batch):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            rows.append(torch.cat([p.detach().flatten() for p in self.build().parameters()]))
        return torch.stack(rows).to(device)

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(row, self.sizes), self.shapes)}

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        module = self.module.to(theta.device)
        call = lambda row, xb: functional_call(module, self.unflatten(row), (xb,))
        return vmap(call, in_dims=(0, 0 if x.dim() == 5 else None))(theta, x)


class ConvNet(nn.Module):
    """The meta-training family: ``depth`` 3x3 conv blocks of ``width`` channels (optionally residual),
    global average pooling, a linear head."""

    def __init__(self, in_channels: int, classes: int, width: int, depth: int, residual: bool):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1))
        self.residual = residual
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for conv in self.blocks:
            h = h + F.relu(conv(h)) if self.residual else F.relu(conv(h))
        return self.head(h.mean((-2, -1)))


class FRN(nn.Module):
    """Filter response normalisation with a thresholded linear unit (Singh & Krishnan 2020)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + self.eps)
        return torch.max(self.gamma * x + self.beta, self.tau)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, stride, 1), FRN(cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, 1, 1), FRN(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class ResNetFRN(nn.Module):
    """ResNet-(6n+2) with FRN and Swish (ResNet20-FRN-Swish: n = 3, widths 16/32/64), as in the paper's
    CIFAR evaluation."""

    def __init__(self, in_channels: int, classes: int, blocks_per_stage: int = 3, width: int = 16):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(in_channels, width, 3, 1, 1), FRN(width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.layers(F.silu(self.norm(self.stem(x))))
        return self.head(h.mean((-2, -1)))


def module_spec(arch: str, in_channels: int, classes: int, width: int, depth: int, residual: bool,
                seed: int = 0) -> ModuleSpec:
    """'cnn' (the family; depth conv layers) or 'resnet_frn' (ResNet-(6 depth + 2) FRN-Swish)."""
    if arch == "cnn":
        return ModuleSpec(lambda: ConvNet(in_channels, classes, width, depth, residual), seed)
    if arch == "resnet_frn":
        return ModuleSpec(lambda: ResNetFRN(in_channels, classes, depth, width), seed)
    raise ValueError(f"unknown architecture '{arch}'")
