"""Ex Uno Pluria (Nam & Lee, NeurIPS 2024): low precision ensembling with Bernoulli stochastic
rounding (LPE-BSR), plus the baselines it is compared with (RTN, SWAG with a low-rank covariance, IVON, snapshot ensembles).

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


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one vector (``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model: nn.Module, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter vector back to ``{name: tensor}`` for ``functional_call`` (inverse of ``flat_params``)."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    if i != vec.numel():
        raise ValueError(f"vector of {vec.numel()} values for a model of {i} parameters")
    return out


class SWAG:
    """SWAG (Maddox et al. 2019): Gaussian N(mean, 1/2 (Sigma_diag + D D^T / (K - 1))) from the SGD
    iterates collected once per epoch at a constant learning rate. Sigma_diag = E[theta^2] - mean^2;
    D holds the last K deviations theta_i - mean_i (mean_i: the running mean after iterate i)."""

    def __init__(self, rank: int):
        if rank < 2:
            raise ValueError(f"SWAG's rank K must be >= 2, got {rank}")
        self.rank, self.count = rank, 0
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None
        self.devs: list[torch.Tensor] = []

    @torch.no_grad()
    def collect(self, model: nn.Module) -> None:
        w = flat_params(model)
        self.count += 1
        if self.mean is None:
            self.mean, self.sq_mean = torch.zeros_like(w), torch.zeros_like(w)
        self.mean += (w - self.mean) / self.count
        self.sq_mean += (w ** 2 - self.sq_mean) / self.count
        self.devs = (self.devs + [w - self.mean])[-self.rank:]

    def state(self) -> dict[str, torch.Tensor]:
        if len(self.devs) < 2:
            raise ValueError(f"SWAG needs >= 2 collected iterates for its low-rank part, got {len(self.devs)}")
        return {"mean": self.mean.clone(), "sq_mean": self.sq_mean.clone(), "dev": torch.stack(self.devs)}

    @staticmethod
    def sample(state: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """theta = mean + Sigma_diag^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K - 1)) (Maddox et al., Eq. 1)."""
        mean, dev = state["mean"], state["dev"]
        var = (state["sq_mean"] - mean ** 2).clamp_min(0.0)
        z1 = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z2 = torch.randn(dev.shape[0], generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + var.sqrt() * z1 / math.sqrt(2) + (dev.T @ z2) / math.sqrt(2 * (dev.shape[0] - 1))


def fit_ivon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
             hess_init: float, weight_decay: float, beta2: float, generator: torch.Generator,
             on_epoch: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """IVON (Shen et al. 2024, the ``ivon-opt`` optimizer): variational learning of a diagonal Gaussian
    posterior with one MC sample per step, effective sample size = the training set size, cosine lr.
    Leaves the posterior mean in ``model``; returns ``{"mean", "sigma"}`` with sigma = 1/sqrt(ess (h + delta))."""
    import ivon

    n = len(y)
    opt = ivon.IVON(model.parameters(), lr=lr, ess=float(n), hess_init=hess_init, weight_decay=weight_decay,
                    beta2=beta2)
    total = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for epoch in range(epochs):
        model.train()
        perm, running = torch.randperm(n, generator=generator), 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            with opt.sampled_params(train=True):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, running / n)
    model.eval()
    group = opt.param_groups[0]
    sigma = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()
    return {"mean": flat_params(model), "sigma": sigma.detach().clone()}


def sample_diagonal(state: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """theta ~ N(mean, diag(sigma^2)): a sample of IVON's posterior."""
    mean = state["mean"]
    return mean + state["sigma"] * torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                               device=mean.device)


def cyclic_cosine_lr(step: int, steps_per_cycle: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Snapshot ensembles (Huang et al. 2017): cosine annealing restarted every cycle."""
    t = (step % steps_per_cycle) / steps_per_cycle
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t))
