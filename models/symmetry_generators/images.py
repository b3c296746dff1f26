"""Image symmetries (the paper's Sec. 5.1 on digits instead of CIFAR-10): a feature-based validity score,
generators on the pixel plane, affine comparison fields, and flow-based augmentation.

A field V on pixel coordinates p = (x, y) in [-1, 1]^2 moves the sampling grid by its RK4 flow Phi^s; the
transformed image is the pull-back f o Phi^s (bilinear ``grid_sample``). Its validity is the angle
between the features of a classifier trained without augmentation,

    S(V, s) = mean_images arccos cos(F(f), F(f o Phi^s))       (lower = more valid),

and generators are learned as in ``generators``: one MLP head per field, made orthonormal on the pixel
grid by A = chol(G)^-1 (a uniform inner product; the paper weights it by a saliency map).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .generators import lipschitz_hinge, orthonormaliser
from .validity import rk4_flow


def pixel_grid(size: int, device=None) -> torch.Tensor:
    """(size, size, 2) coordinates (x across, y down) in [-1, 1], as ``grid_sample`` reads them."""
    axis = torch.linspace(-1, 1, size, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y], dim=-1)


def affine_fields() -> dict:
    """The six affine generators and the two named combinations (rotation, isotropic scaling)."""
    zero = lambda p: torch.zeros_like(p[..., 0])
    one = lambda p: torch.ones_like(p[..., 0])
    x, y = (lambda p: p[..., 0]), (lambda p: p[..., 1])
    make = lambda fx, fy: (lambda p: torch.stack([fx(p), fy(p)], dim=-1))
    return {"translate_x": make(one, zero), "translate_y": make(zero, one),
            "stretch_x": make(x, zero), "stretch_y": make(zero, y),
            "shear_x": make(y, zero), "shear_y": make(zero, x),
            "rotation": make(lambda p: -y(p), x), "scaling": make(x, y)}


class FeatureCNN(nn.Module):
    """Two small conv blocks, a feature layer and a linear classifier (the feature extractor F)."""

    def __init__(self, size: int, channels: int, feature_dim: int, classes: int, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(self.conv, nn.Flatten(),
                                      nn.Linear(2 * channels * (size // 4) ** 2, feature_dim))
        self.classify = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class PlaneGeneratorNet(nn.Module):
    """Trunk (x, y) -> width -> width (SiLU), one head width -> head_width -> 2 per generator."""

    def __init__(self, n_generators: int, width: int, head_width: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(width, head_width), nn.SiLU(),
                                                 nn.Linear(head_width, 2)) for _ in range(n_generators))
        self.register_buffer("mix", torch.eye(n_generators))

    def raw(self, p: torch.Tensor) -> torch.Tensor:
        h = self.trunk(p)
        return torch.stack([head(h) for head in self.heads], dim=-2)

    def field(self, i: int, mix: torch.Tensor | None = None):
        mix = self.mix if mix is None else mix
        return lambda p: torch.einsum("j,...jc->...c", mix[i], self.raw(p))

    def combined(self, coef: torch.Tensor):
        """Per-image fields sum_j coef[b, j] V_j for points (b, ..., 2)."""
        weights = coef @ self.mix                                               # (b, n_generators)
        return lambda p: torch.einsum("bj,b...jc->b...c", weights, self.raw(p))


def flowed_grid(field, size: int, s, rk4_steps: int, batch: int | None = None, device=None) -> torch.Tensor:
    """Phi^s of the pixel grid: (size, size, 2) for a shared field, (batch, size, size, 2) for per-image
    fields (points (batch, size, size, 2))."""
    grid = pixel_grid(size, device)
    if batch is not None:
        grid = grid.expand(batch, size, size, 2)
    return rk4_flow(field, grid, s, rk4_steps)


def warp(images: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """f o Phi: bilinear pull-back of images (b, 1, h, w) at the moved grid ((h, w, 2) or (b, h, w, 2))."""
    if moved.dim() == 3:
        moved = moved.expand(images.shape[0], *moved.shape)
    return F.grid_sample(images, moved.to(images), mode="bilinear", padding_mode="zeros", align_corners=True)


def feature_validity(extractor: FeatureCNN, images: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """mean arccos cos(F(f), F(f o Phi)) (clamped as in the paper)."""
    cos = F.cosine_similarity(extractor.features(images), extractor.features(moved), dim=-1)
    return torch.arccos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean()


@dataclass(frozen=True)
class PlaneTrainConfig:
    steps: int
    lr: float
    batch: int
    sigma: float            # s ~ U(-sigma, sigma), one s per batch (as the paper's image code)
    rk4_steps: int
    lipschitz_weight: float
    lipschitz_tau: float


def fit_plane_generators(net: PlaneGeneratorNet, extractor: FeatureCNN, images: torch.Tensor,
                         cfg: PlaneTrainConfig, generator: torch.Generator, on_step=None) -> PlaneGeneratorNet:
    """Adam on sum_i S(V_i, s) + Lipschitz hinge, with the heads orthonormal on the pixel grid."""
    for param in extractor.parameters():
        param.requires_grad_(False)
    size = images.shape[-1]
    grid = pixel_grid(size, images.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for step in range(cfg.steps):
        batch = images[torch.randint(0, len(images), (cfg.batch,), generator=generator)]
        s = (2 * torch.rand((), generator=generator) - 1) * cfg.sigma
        raw = net.raw(grid)
        mix = orthonormaliser(raw)
        scores = [feature_validity(extractor, batch, warp(batch, flowed_grid(net.field(i, mix), size, s,
                                                                              cfg.rk4_steps, device=grid.device)))
                  for i in range(mix.shape[0])]
        fields = torch.einsum("ij,...jc->...ic", mix, raw)[None]               # (1, h, w, k, 2)
        spacing = 2 / (size - 1)
        loss = sum(scores) + cfg.lipschitz_weight * lipschitz_hinge(fields, (spacing, spacing), cfg.lipschitz_tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, float(loss.detach()))
    with torch.no_grad():
        net.mix.copy_(orthonormaliser(net.raw(grid)))
    return net


def field_correlation(a, b, size: int, device=None) -> float:
    """<a, b> / (|a| |b|) with the uniform inner product on the pixel grid."""
    grid = pixel_grid(size, device).reshape(-1, 2)
    with torch.no_grad():
        va, vb = a(grid), b(grid)
        return float((va * vb).sum() / (va.norm() * vb.norm()))


def train_classifier(model: FeatureCNN, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int,
                     lr: float, generator: torch.Generator, augment=None) -> FeatureCNN:
    """Adam on cross-entropy; ``augment(batch, generator)`` transforms each batch when given."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            idx = order[start:start + batch]
            x = images[idx] if augment is None else augment(images[idx], generator)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def flow_augmenter(make_field, n_fields: int, scale: float, rk4_steps: int):
    """Per image coefficients u_j ~ U(-scale, scale); the image is pulled back along the flow of
    sum_j u_j V_j over s in [0, 1] (the paper's image augmentation)."""
    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        coef = ((2 * torch.rand(len(x), n_fields, generator=generator) - 1) * scale).to(x.device)
        with torch.no_grad():
            return warp(x, flowed_grid(make_field(coef), x.shape[-1], 1.0, rk4_steps, len(x), x.device))
    return augment


def affine_maker(names: list[str], size: int):
    """coef (b, k) -> the per-image field sum_j coef[b, j] A_j / |A_j| (unit RMS on the pixel grid)."""
    fields = [affine_fields()[n] for n in names]
    grid = pixel_grid(size).reshape(-1, 2)
    norms = [float(f(grid).pow(2).sum(-1).mean().sqrt()) for f in fields]

    def make(coef: torch.Tensor):
        return lambda p: sum(coef[:, j].reshape(-1, 1, 1, 1) * f(p) / norm
                             for j, (f, norm) in enumerate(zip(fields, norms)))
    return make
