"""Hue-shift equivariant convolutions (CEConv, Lengyel et al. 2023) with kept-element distributions.

The group H_m: hue rotations by 2 pi k / m, a rotation of RGB space about the grey axis (1, 1, 1). Layers:

    image [B, 3, H, W] --HueLiftingConv--> f [B, C, m, H, W] (f_k = conv(H_k img, W)) --mask, BN, ReLU-->
    --HueGroupConv (f'_k = 1/n_in sum_{j kept} conv(f_j, W_{j-k}))--> ... --mean over space and kept shifts-->
    Linear

Each layer keeps a subset of its m output shifts (dropped features are zero; later sums and the final pooling
divide by the number kept). How the subset is chosen (``kind``):

* ``cnn``:      m = 1 (only the identity);
* ``ce``:       all m shifts (the colour-equivariant, colour-invariant after pooling, CE-CNN);
* ``partial``:  per layer, one RelaxedBernoulli per non-identity shift with a straight-through 0.5 threshold
                (Partial G-CNN's discrete-group distribution; Gumbel temperature annealed 0.5 -> 1e-4);
* ``vp``:       per input, the redesigned distribution (VP G-CNN v1.2): an encoder gives a temperature
                tau(f) = 0.1 + (tau_max - 0.1) sigmoid(.), pi_k = softmax_k(-d_k / tau) over the circular
                distance d_k of shift k to the identity, keep k iff pi_k > 1 / (m + 1) (straight-through);
                regulariser sum_k (pi_k - 1 / (m + 0.5))^2 pulls towards the full group;
* ``vp_bernoulli``: per input, RelaxedBernoulli on encoder logits (VP v1.0, the comparison), regulariser
                -log p_keep (the prior keeps every shift).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import MaskedBatchNorm, group_max_pool, masked_mean

KINDS = ("cnn", "ce", "partial", "vp", "vp_bernoulli")


def hue_matrix(angle: float) -> torch.Tensor:
    """Rotation of RGB space by ``angle`` about the grey axis (Rodrigues); 120 degrees permutes R -> G -> B."""
    a = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    r = math.cos(angle) * torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross \
        + (1 - math.cos(angle)) * torch.outer(a, a)
    return r.float()


def hue_shift(img: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """H_k img for images [B, 3, H, W]."""
    return torch.einsum("ij,bjhw->bihw", hue_matrix(2 * math.pi * k / m).to(img), img)


class HueLiftingConv(nn.Module):
    def __init__(self, c_out: int, m: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, 3, size, size) * math.sqrt(2 / (3 * size * size)))
        self.register_buffer("hues", torch.stack([hue_matrix(2 * math.pi * k / m) for k in range(m)]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        w = torch.einsum("ochw,kcd->okdhw", self.weight, self.hues)  # conv(img, W H_k) = conv(H_k img, W)
        out = nn.functional.conv2d(img, w.reshape(-1, 3, *w.shape[-2:]), padding=w.shape[-1] // 2)
        return out.unflatten(1, (self.weight.shape[0], self.hues.shape[0]))


class HueGroupConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, m: int, size: int):
        super().__init__()
        self.m = m
        self.weight = nn.Parameter(torch.randn(c_out, c_in, m, size, size) * math.sqrt(2 / (c_in * size * size)))
        idx = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m  # [k, j] -> j - k
        self.register_buffer("idx", idx)

    def forward(self, f: torch.Tensor, mask_in: torch.Tensor) -> torch.Tensor:
        co, ci, m = self.weight.shape[:3]
        w = self.weight[:, :, self.idx]  # [Co, Ci, k, j, K, K]
        w = w.permute(0, 2, 1, 3, 4, 5).reshape(co * m, ci * m, *w.shape[-2:])
        b, _, _, h, wd = f.shape
        out = nn.functional.conv2d(f.reshape(b, ci * m, h, wd), w, padding=w.shape[-1] // 2)
        return out.unflatten(1, (co, m)) / mask_in.sum(-1).clamp(min=1)[:, None, None, None, None]


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return hard + soft - soft.detach()


class FirstEncoder(nn.Module):
    """On the image: conv3x3 s2 -> ReLU -> conv3x3 s2 -> ReLU -> global average pool -> Linear."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out))

    def forward(self, img: torch.Tensor, mask=None) -> torch.Tensor:
        return self.net(img)


class GroupEncoder(nn.Module):
    """On group features: pool space -> circular 1-D conv over the shifts -> ReLU -> mean over kept -> Linear."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1, padding_mode="circular")
        self.out = nn.Linear(channels, out)

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        g = torch.relu(self.conv(f.mean(dim=(-1, -2))))
        return self.out((g * mask[:, None]).sum(-1) / mask.sum(-1, keepdim=True).clamp(min=1))


class KeepDistribution(nn.Module):
    """Which of a layer's m output shifts to keep, per input: (mask [B, m] with straight-through gradient,
    regulariser [B], soft keep probabilities [B, m])."""

    def __init__(self, kind: str, m: int, encoder: nn.Module | None, tau_max: float, keep_init: float):
        super().__init__()
        self.kind, self.m, self.encoder, self.tau_max, self.temperature = kind, m, encoder, tau_max, 0.5
        d = torch.arange(m)
        self.register_buffer("distance", torch.minimum(d, m - d).float())
        logit = math.log(keep_init / (1 - keep_init))
        self.logits = nn.Parameter(torch.full((m - 1,), logit)) if kind == "partial" else None
        if encoder is not None:
            last = encoder.net[-1] if hasattr(encoder, "net") else encoder.out
            nn.init.zeros_(last.weight)
            nn.init.constant_(last.bias, logit if kind == "vp_bernoulli" else 0.0)

    def _bernoulli(self, logits: torch.Tensor):
        if self.training:
            noise = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + torch.log(noise) - torch.log1p(-noise)) / self.temperature)
        else:
            soft = torch.sigmoid(logits)
        keep = straight_through((soft > 0.5).to(soft.dtype), soft)
        ones = torch.ones_like(keep[:, :1])
        return torch.cat([ones, keep], -1), torch.cat([ones, torch.sigmoid(logits)], -1)

    def forward(self, source: tuple, b: int):
        """``source``: the layer's input (image, None) or (features, mask) for the encoder."""
        ref = source[0]
        if self.kind in ("cnn", "ce"):
            ones = torch.ones(b, self.m, dtype=ref.dtype, device=ref.device)
            return ones, torch.zeros(b, dtype=ref.dtype, device=ref.device), ones
        if self.kind == "partial":
            mask, probs = self._bernoulli(self.logits[None].expand(b, -1))
            return mask, torch.zeros(b, dtype=ref.dtype, device=ref.device), probs
        raw = self.encoder(*source)
        if self.kind == "vp_bernoulli":
            mask, probs = self._bernoulli(raw)
            return mask, -nn.functional.logsigmoid(raw).mean(-1), probs
        tau = 0.1 + (self.tau_max - 0.1) * torch.sigmoid(raw[:, 0])
        pi = torch.softmax(-self.distance[None] / tau[:, None], -1)
        mask = straight_through((pi > 1 / (self.m + 1)).to(pi.dtype), pi)
        return mask, ((pi - 1 / (self.m + 0.5)) ** 2).sum(-1), pi


class ColourNet(nn.Module):
    """Hue lifting + ``layers - 1`` hue group convolutions, each followed by its kept-shift distribution.

    After a forward pass: ``kept`` [B, layers] is the fraction of shifts kept per layer, ``reg`` the mean
    regulariser (summed over layers)."""

    def __init__(self, kind: str, m: int, channels: int, layers: int, kernel_size: int, n_classes: int,
                 encoder_width: int, keep_init: float):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.m = kind, 1 if kind == "cnn" else m
        self.lift = HueLiftingConv(channels, self.m, kernel_size)
        self.convs = nn.ModuleList(HueGroupConv(channels, channels, self.m, kernel_size) for _ in range(layers - 1))
        self.norms = nn.ModuleList(MaskedBatchNorm(channels) for _ in range(layers))
        variational = kind in ("vp", "vp_bernoulli")
        outs = 1 if kind == "vp" else self.m - 1
        encoders = ([FirstEncoder(encoder_width, outs)] + [GroupEncoder(channels, outs) for _ in range(layers - 1)]
                    if variational else [None] * layers)
        self.keeps = nn.ModuleList(KeepDistribution(kind, self.m, e, 6.0 * 2 ** (m // 3 - 1), keep_init)
                                   for e in encoders)
        self.head = nn.Linear(channels, n_classes)
        self.kept = torch.zeros(0)
        self.reg = torch.zeros(())

    def theta_parameters(self) -> list[nn.Parameter]:
        return [p for k in self.keeps for p in k.parameters()]

    def set_temperature(self, value: float) -> None:
        for k in self.keeps:
            k.temperature = value

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b = img.shape[0]
        kept, reg = [], torch.zeros((), dtype=img.dtype, device=img.device)
        source, f, hard = (img, None), None, None
        for layer, norm in enumerate(self.norms):
            pre = self.lift(img) if layer == 0 else self.convs[layer - 1](f, hard)
            mask, r, _ = self.keeps[layer](source, b)
            hard = mask.detach()
            f = torch.relu(norm(pre * mask[:, None, :, None, None], hard))
            if layer == 0:
                f = group_max_pool(f)
            source = (f, hard)
            kept.append(hard.mean(-1))
            reg = reg + r.mean()
        self.kept, self.reg = torch.stack(kept, -1), reg
        return self.head(masked_mean(f, hard))

    def regulariser(self) -> torch.Tensor:
        return self.reg
