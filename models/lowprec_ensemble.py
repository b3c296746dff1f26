"""Ex Uno Pluria (Nam & Lee, NeurIPS 2024): low precision ensembling with Bernoulli stochastic
rounding (LPE-BSR), plus the baselines it is compared with (RTN, SWAG-diagonal, snapshot ensembles).

All functions are pure torch: no files, no tracking.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def qmax(bits: int) -> int:
    """Largest integer of the symmetric INT-b grid {-(2^(b-1)-1), ..., 2^(b-1)-1}."""
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in [2, 32], got {bits}")
    return 2 ** (bits - 1) - 1


def channel_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel step s = max|w_c| / (2^(b-1) - 1), shaped to broadcast against ``w``."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    s = amax / qmax(bits)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero channel stays zero at any step
    return s.reshape(-1, *([1] * (w.dim() - 1)))


def round_to_nearest(w: torch.Tensor, bits: int) -> torch.Tensor:
    """RTN: the deterministic baseline, s * clip(round(w / s))."""
    s, q = channel_scale(w, bits), qmax(bits)
    return torch.round(w / s).clamp(-q, q) * s


def stochastic_round(w: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli stochastic rounding (the paper's Eq. for LPE-BSR):
    w_hat = s * (floor(w/s) + xi), xi ~ Bernoulli(w/s - floor(w/s)), so E[w_hat] = w; then clip."""
    s, q = channel_scale(w, bits), qmax(bits)
    u = w / s
    low = torch.floor(u)
    xi = (torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device) < (u - low)).to(u.dtype)
    return (low + xi).clamp(-q, q) * s


def quantizable_names(model: nn.Module) -> list[str]:
    """Weights of linear and convolution layers; biases and norms stay in full precision."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def quantized_params(model: nn.Module, bits: int, mode: str = "stochastic",
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Quantized copies of the quantizable weights (one ensemble member), for ``functional_call``."""
    params = dict(model.named_parameters())
    out = {}
    for name in quantizable_names(model):
        w = params[name].detach()
        out[name] = stochastic_round(w, bits, generator) if mode == "stochastic" else round_to_nearest(w, bits)
    return out


def count_params(model: nn.Module) -> tuple[int, int]:
    """(quantized weights, parameters kept in full precision)."""
    qnames = set(quantizable_names(model))
    q = sum(p.numel() for n, p in model.named_parameters() if n in qnames)
    return q, sum(p.numel() for p in model.parameters()) - q


def memory_bits(model: nn.Module, members: int, bits: int | None) -> int:
    """Memory of an ensemble: M * (b * quantized + 32 * full-precision) bits; bits=None is FP32."""
    q, fp = count_params(model)
    return members * ((32 if bits is None else bits) * q + 32 * fp)


@torch.no_grad()
def predict_probs(model: nn.Module, batches: Callable[[], Iterator[tuple[torch.Tensor, ...]]],
                  params: dict[str, torch.Tensor] | None = None,
                  logits_of: Callable[[object], torch.Tensor] = lambda out: out) -> torch.Tensor:
    """Class probabilities of ``model`` (optionally with some parameters replaced) over ``batches()``."""
    model.eval()
    outs = []
    for batch in batches():
        x = batch[0]
        out = functional_call(model, params, (x,), strict=False) if params else model(x)
        outs.append(torch.softmax(logits_of(out).float(), dim=-1).cpu())
    return torch.cat(outs)


def lpe_bsr_members(model: nn.Module, batches, bits: int, members: int, generator: torch.Generator,
                    logits_of=lambda out: out) -> Iterator[torch.Tensor]:
    """Stream LPE-BSR members: each draws its own stochastic rounding, one in memory at a time."""
    for _ in range(members):
        yield predict_probs(model, batches, quantized_params(model, bits, "stochastic", generator), logits_of)


def ensemble_mean(member_probs: torch.Tensor) -> torch.Tensor:
    """Average in probability space: p(y|x) = 1/M sum_m softmax(f(x; W_m)). Input [M, N, C]."""
    return member_probs.mean(dim=0)


class SWAGDiagonal:
    """SWAG with a diagonal covariance (Maddox et al. 2019): running first and second moments of the
    weights along the SGD trajectory; samples theta ~ N(mean, diag(E[theta^2] - mean^2))."""

    def __init__(self, model: nn.Module):
        self.names = [n for n, _ in model.named_parameters()]
        self.mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.sq_mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.count = 0

    @torch.no_grad()
    def collect(self, model: nn.Module) -> None:
        self.count += 1
        for n, p in model.named_parameters():
            self.mean[n] += (p.detach() - self.mean[n]) / self.count
            self.sq_mean[n] += (p.detach() ** 2 - self.sq_mean[n]) / self.count

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"mean.{n}": t for n, t in self.mean.items()}
        out.update({f"sq_mean.{n}": t for n, t in self.sq_mean.items()})
        return out

    @staticmethod
    def sample(state: dict[str, torch.Tensor], generator: torch.Generator,
               scale: float = 1.0) -> dict[str, torch.Tensor]:
        out = {}
        for key, mean in state.items():
            if not key.startswith("mean."):
                continue
            name = key[len("mean."):]
            var = (state[f"sq_mean.{name}"] - mean ** 2).clamp_min(1e-30)
            z = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            out[name] = mean + scale * var.sqrt() * z
        return out


def cyclic_cosine_lr(step: int, steps_per_cycle: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Snapshot ensembles (Huang et al. 2017): cosine annealing restarted every cycle."""
    t = (step % steps_per_cycle) / steps_per_cycle
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t))
