"""Group convolutions with continuous kernels over sampled rotations: CNN, G-CNN, Partial G-CNN, VP G-CNN.

Data flow (one backbone, four ways of choosing each layer's output rotations u):

    image [B, 1, H, W] --LiftingConv--> f [B, C, N, H, W] on the full circle (mask [B, N])
      --BN, ReLU, 2x2 max pool--> GroupConv (u sampled by the layer's sampler) --BN, ReLU, pool--> ...
      --mean over space and kept rotations--> Linear --> logits

Kernels are an MLP k(R(-u) p, cos(v - u), sin(v - u)) on kernel positions p (disk of radius 1) and the
offset between an input rotation v and an output rotation u (Romero & Lohit 2022; Kim et al. 2024 eq. 2),
so any set of rotations can be sampled. Output rotations of a layer:

* ``cnn``:     N = 1, u = 0 (the identity: a plain CNN with the same kernel MLPs);
* ``gcnn``:    the full circle, u_i = -pi + 2 pi (i + delta) / N (delta = 0 at evaluation: exact C_N);
* ``partial``: one theta_l per layer, u_i stratified uniform on [-pi theta_l, pi theta_l];
* ``vp``:      theta(f) from an encoder on the layer's input, per input, reparametrised
               u_i = pi theta(f) (-1 + 2 (i + delta) / n), n = ceil(N theta(f)); KL(q || U(S^1)) = -log theta.

theta is a sigmoid (strictly inside (0, 1), initialised at ``theta_init``): the clamp-at-1 trap of the toy
measurement (|output| above 1 zeroes both gradients) cannot happen.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import MaskedBatchNorm, group_max_pool, masked_mean

KINDS = ("cnn", "gcnn", "partial", "vp")


def stratified_angles(theta: torch.Tensor, n_max: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles [B, n_max] stratified uniform on [-pi theta, pi theta] and their mask.

    n = ceil(n_max theta) of the n_max slots are used (the rest are masked); slot i < n holds
    pi theta (-1 + 2 (i + offset) / n), offset in [0, 1): one draw per stratum of width 2 pi theta / n,
    differentiable in theta (the reparametrisation u = r(theta, offset))."""
    n = torch.ceil(n_max * theta.detach() - 1e-6).clamp(1, n_max)
    i = torch.arange(n_max, dtype=theta.dtype, device=theta.device)
    u = math.pi * theta[:, None] * (-1 + 2 * (i[None] + offset[:, None]) / n[:, None])
    return u, (i[None] < n[:, None]).to(theta.dtype)


def kernel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel positions p [P, 2] inside the unit disk (x right, y down, radius 1 at the border's middle) and
    their flat indices in the K x K grid (a disk support is closed under rotations)."""
    r = (size - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 2) / max(r, 1.0)
    inside = torch.nonzero(p.norm(dim=-1) <= 1 + 1e-6)[:, 0]
    return p[inside], inside


def scatter_kernel(k: torch.Tensor, inside: torch.Tensor, size: int) -> torch.Tensor:
    """Kernel values on the disk positions (dim -3) -> the full K x K grid (zeros outside the disk)."""
    full = k.new_zeros(*k.shape[:-3], size * size, *k.shape[-2:])
    full[..., inside, :, :] = k
    return full


def rotate_positions(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """R(-u) p for every angle: p [P, 2], u [..., N] -> [..., N, P, 2]."""
    c, s = torch.cos(u)[..., None], torch.sin(u)[..., None]
    x, y = p[:, 0], p[:, 1]
    return torch.stack([c * x + s * y, -s * x + c * y], -1)


class KernelNet(nn.Module):
    """The continuous kernel: an MLP from (rotated position[, group offset]) to C_out x C_in weights."""

    def __init__(self, in_dim: int, hidden: int, c_out: int, c_in: int):
        super().__init__()
        self.c_out, self.c_in = c_out, c_in
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, c_out * c_in))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, (self.c_out, self.c_in))


class LiftingConv(nn.Module):
    """f_u(x) = sum_p k(R(-u) p) img(x + p) on the output rotations u [B or 1, N]."""

    def __init__(self, c_in: int, c_out: int, size: int, hidden: int):
        super().__init__()
        p, inside = kernel_grid(size)
        self.register_buffer("p", p)
        self.register_buffer("inside", inside)
        self.size, self.c_out = size, c_out
        self.kernel = KernelNet(2, hidden, c_out, c_in)
        self.scale = 1.0 / math.sqrt(c_in * len(inside))

    def forward(self, img: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        bk, n = u.shape
        k = scatter_kernel(self.kernel(rotate_positions(self.p, u)) * self.scale, self.inside, self.size)
        w = k.permute(0, 3, 1, 4, 2).reshape(bk, self.c_out * n, -1, self.size, self.size)
        return _conv(img, w, bk).unflatten(1, (self.c_out, n))


class GroupConv(nn.Module):
    """f'_u(x) = 1/n_in sum_{v kept} sum_p k(R(-u) p, v - u) f_v(x + p) on output rotations u."""

    def __init__(self, c_in: int, c_out: int, size: int, hidden: int):
        super().__init__()
        p, inside = kernel_grid(size)
        self.register_buffer("p", p)
        self.register_buffer("inside", inside)
        self.size, self.c_out = size, c_out
        self.kernel = KernelNet(4, hidden, c_out, c_in)
        self.scale = 1.0 / math.sqrt(c_in * len(inside))

    def forward(self, f: torch.Tensor, v: torch.Tensor, mask_in: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """f [B, Ci, Ni, H, W] on input rotations v [bk, Ni] (mask_in [bk, Ni]); u [bk, No]."""
        bk, n_out = u.shape
        n_in, npos = v.shape[1], self.p.shape[0]
        pos = rotate_positions(self.p, u)[:, :, None].expand(bk, n_out, n_in, npos, 2)
        d = (v[:, None, :] - u[:, :, None])[..., None].expand(bk, n_out, n_in, npos)
        k = self.kernel(torch.cat([pos, torch.cos(d)[..., None], torch.sin(d)[..., None]], -1))  # [bk,No,Ni,P,Co,Ci]
        weight = (mask_in / mask_in.sum(-1, keepdim=True))[:, None, :, None, None, None] * self.scale
        k = scatter_kernel(k * weight, self.inside, self.size)
        w = k.permute(0, 4, 1, 5, 2, 3).reshape(bk, self.c_out * n_out, -1, self.size, self.size)
        b, c, ni, h, wd = f.shape
        return _conv(f.reshape(b, c * ni, h, wd), w, bk).unflatten(1, (self.c_out, n_out))


def _conv(x: torch.Tensor, w: torch.Tensor, bk: int) -> torch.Tensor:
    """Shared kernels (bk = 1): one conv2d; per-input kernels (bk = B): one grouped conv2d."""
    pad = w.shape[-1] // 2
    if bk == 1:
        return nn.functional.conv2d(x, w[0], padding=pad)
    b = x.shape[0]
    out = nn.functional.conv2d(x.reshape(1, -1, *x.shape[-2:]), w.reshape(-1, *w.shape[2:]), padding=pad,
                               groups=b)
    return out.reshape(b, -1, *out.shape[-2:])


class ThetaEncoder(nn.Module):
    """theta(f) in (0, 1): pool f over space and kept rotations -> Linear(C, 2C) -> LeakyReLU -> Linear(2C, 1)
    -> sigmoid; the last layer starts at weight 0 and bias logit(theta_init) (every input starts alike)."""

    def __init__(self, channels: int, theta_init: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, 2 * channels), nn.LeakyReLU(0.1), nn.Linear(2 * channels, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, math.log(theta_init / (1 - theta_init)))

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(masked_mean(f, mask))[:, 0])


class RotationNet(nn.Module):
    """Lifting layer + ``group_layers`` group convolutions; ``kind`` picks how output rotations are chosen.

    After a forward pass, ``thetas`` holds theta per input [B] of every group layer and ``kl`` the mean
    over inputs of sum_l -log theta_l (the KL of q(u | f) to the uniform prior on the circle; 0 unless vp)."""

    def __init__(self, kind: str, n_rotations: int, channels: int, hidden: int, kernel_size: int,
                 n_classes: int, group_layers: int, theta_init: float, in_channels: int = 1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.n = kind, 1 if kind == "cnn" else n_rotations
        self.lift = LiftingConv(in_channels, channels, kernel_size, hidden)
        self.convs = nn.ModuleList(GroupConv(channels, channels, kernel_size, hidden) for _ in range(group_layers))
        self.norms = nn.ModuleList(MaskedBatchNorm(channels) for _ in range(group_layers + 1))
        self.head = nn.Linear(channels, n_classes)
        logit = math.log(theta_init / (1 - theta_init))
        self.theta_logits = nn.Parameter(torch.full((group_layers,), logit)) if kind == "partial" else None
        self.encoders = (nn.ModuleList(ThetaEncoder(channels, theta_init) for _ in range(group_layers))
                         if kind == "vp" else None)
        self.thetas: list[torch.Tensor] = []
        self.kl = torch.zeros(())

    def theta_parameters(self) -> list[nn.Parameter]:
        """Parameters of the learned subsets (their own learning rate)."""
        if self.kind == "partial":
            return [self.theta_logits]
        return list(self.encoders.parameters()) if self.kind == "vp" else []

    def _offset(self, rows: int, ref: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.zeros(rows, dtype=ref.dtype, device=ref.device)
        return torch.rand(rows, dtype=ref.dtype, device=ref.device)

    def _output_rotations(self, layer: int, f: torch.Tensor, mask: torch.Tensor):
        b = f.shape[0]
        if self.kind == "cnn":
            theta = torch.zeros(1, dtype=f.dtype, device=f.device)
            return torch.zeros(1, 1, dtype=f.dtype, device=f.device), torch.ones(1, 1, device=f.device), theta
        if self.kind == "vp":
            theta = self.encoders[layer](f, mask)
            u, m = stratified_angles(theta, self.n, self._offset(b, f))
            return u, m, theta
        theta = (torch.sigmoid(self.theta_logits[layer])[None] if self.kind == "partial"
                 else torch.ones(1, dtype=f.dtype, device=f.device))
        u, m = stratified_angles(theta, self.n, self._offset(1, f))
        return u, m, theta

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b = img.shape[0]
        if self.kind == "cnn":
            v, mask = torch.zeros(1, 1, dtype=img.dtype, device=img.device), torch.ones(1, 1, device=img.device)
        else:
            v, mask = stratified_angles(torch.ones(1, dtype=img.dtype, device=img.device), self.n,
                                        self._offset(1, img))
        f = torch.relu(self.norms[0](self.lift(img, v), mask.expand(b, -1)))
        f = group_max_pool(f)
        self.thetas, kl = [], torch.zeros((), dtype=img.dtype, device=img.device)
        for layer, conv in enumerate(self.convs):
            u, m, theta = self._output_rotations(layer, f, mask.expand(b, -1))
            f = torch.relu(self.norms[layer + 1](conv(f, v, mask, u), m.expand(b, -1)))
            if layer < len(self.convs) - 1:
                f = group_max_pool(f)
            self.thetas.append(theta.expand(b))
            if self.kind == "vp":
                kl = kl - torch.log(theta).mean()
            v, mask = u, m
        self.kl = kl
        return self.head(masked_mean(f, mask.expand(b, -1)))

    def regulariser(self) -> torch.Tensor:
        return self.kl
