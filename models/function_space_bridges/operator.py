"""A resolution-free neural operator: Perceiver-IO-like, on coordinates (notes section 2, item 7).

Input tokens are a function's values at its grid points plus Gaussian Fourier features of the points'
coordinates in [0, 1]^d; a fixed set of learned latent tokens reads them by cross-attention, processes
them by self-attention, and output queries read the latents by cross-attention. A query is the Fourier
features of an output point plus the embedded input value at that point (the output grid is the input
grid or a subset of it), and the output is that value plus the decoded correction: with 16 latents the
operator need not squeeze the whole input through the latents to reproduce it. Nothing depends on the
number of grid points, so a model trained on one grid runs on another. Time t enters every block by
adaLN-Zero modulation (DiT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OperatorConfig:
    dim: int                  # 1 (functions on [0, 1]) or 2 (images on [0, 1]^2)
    channels: int             # values per point
    width: int
    latents: int
    heads: int
    encoder_blocks: int       # each: cross-attention (latents <- inputs) + self-attention
    decoder_blocks: int       # each: cross-attention (queries <- latents)
    fourier_features: int
    fourier_scale: float
    mlp_ratio: int


def grid_coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """Cell centres of a regular grid on [0, 1]^d, [prod(shape), d] (row-major, as .reshape flattens)."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def timestep_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, w // self.heads).transpose(1, 2)
        k, v = self.kv(context).chunk(2, dim=-1)
        h = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v))
        return self.out(h.transpose(1, 2).reshape(b, n, w))


class AdaBlock(nn.Module):
    """Pre-norm attention + MLP with adaLN-Zero: shift, scale and gate from the time embedding."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, cross: bool):
        super().__init__()
        self.cross = cross
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm_context = nn.LayerNorm(width) if cross else None
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, self.norm_context(context) if self.cross else h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class OperatorTransformer(nn.Module):
    """f_theta(u_t on grid G_in, t) -> predicted endpoint on grid G_out (any G_in, G_out)."""

    def __init__(self, cfg: OperatorConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.register_buffer("frequencies", torch.randn(cfg.dim, cfg.fourier_features) * cfg.fourier_scale)
        self.value_in = nn.Linear(cfg.channels, w)
        self.position_in = nn.Linear(2 * cfg.fourier_features, w)
        self.position_query = nn.Linear(2 * cfg.fourier_features, w)
        self.value_query = nn.Linear(cfg.channels, w)
        self.latents = nn.Parameter(torch.randn(cfg.latents, w) * 0.02)
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.encoder = nn.ModuleList()
        for _ in range(cfg.encoder_blocks):
            self.encoder.append(AdaBlock(w, cfg.heads, cfg.mlp_ratio, cross=True))
            self.encoder.append(AdaBlock(w, cfg.heads, cfg.mlp_ratio, cross=False))
        self.decoder = nn.ModuleList(AdaBlock(w, cfg.heads, cfg.mlp_ratio, cross=True)
                                     for _ in range(cfg.decoder_blocks))
        self.norm_out = nn.LayerNorm(w)
        self.value_out = nn.Linear(w, cfg.channels)

    def fourier(self, coords: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * coords @ self.frequencies
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, values: torch.Tensor, coords: torch.Tensor, t: torch.Tensor,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        """values [B, N, C] at coords [N, d]; returns [B, M, C] at the points ``query_index`` (default: all)."""
        b = values.shape[0]
        query_coords = coords if query_index is None else coords[query_index]
        query_values = values if query_index is None else values[:, query_index]
        tokens = self.value_in(values) + self.position_in(self.fourier(coords))[None]
        temb = self.time(timestep_embedding(t, self.cfg.width))
        z = self.latents[None].expand(b, -1, -1)
        for i, block in enumerate(self.encoder):
            z = block(z, temb, tokens if block.cross else None)
        q = self.position_query(self.fourier(query_coords))[None] + self.value_query(query_values)
        for block in self.decoder:
            q = block(q, temb, z)
        return query_values + self.value_out(self.norm_out(q))

