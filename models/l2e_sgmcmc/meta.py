"""Meta-training the per-weight MLP of L2E by antithetic evolution strategies (no backpropagation
through the unroll).

Meta-loss of meta-parameters phi on a task: run the sampler from a fresh initialisation of the task's
network for ``unroll`` steps, keep K thinned samples of the last ``sample_window`` steps, and score the
Bayesian model average on the task's *validation* split,
    L(phi) = -mean_i log((1/K) sum_k softmax(f(x_i; theta_k))_{y_i}) / log(classes).
The antithetic ES estimate with P pairs, g = (1/P) sum_p [L(phi + s e_p) - L(phi - s e_p)] / (2 s) e_p,
runs all 2P perturbed samplers as one batch of chains; a pair shares its initialisation, minibatches and
noise (common random numbers). Adam with gradient-norm clipping updates phi.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .network import MLPSpec, probabilities
from .sampler import Dynamics, LearnedKinetic, init_kinetic_net, run_chains, thinned_steps


@dataclass(frozen=True)
class Task:
    """One classification task: an MLP and its train / validation tensors."""

    name: str
    spec: object                 # MLPSpec, or convnets.ModuleSpec at paper scale
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max())) + 1


@dataclass(frozen=True)
class MetaConfig:
    hidden: int
    multiplier: float            # exp_mult = precond_mult
    pairs: int
    sigma: float
    lr: float
    clip: float
    unroll: int
    batch_size: int
    samples: int
    sample_window: int
    step_mult: float
    friction: float
    temperature: float
    weight_decay: float
    loss_cap: float              # a diverged sampler scores this (normalised NLL)

    def dynamics(self, n_data: int) -> Dynamics:
        return Dynamics(n_data, self.step_mult, self.friction, self.temperature, self.weight_decay)

    def kinetic(self, phi: torch.Tensor, spec: MLPSpec) -> LearnedKinetic:
        return LearnedKinetic(phi, self.hidden, self.multiplier, self.multiplier, spec)


def bma_nll(spec: MLPSpec, samples: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NLL [B] of the average of K samples' predictions ([K, B, D] samples), per chain."""
    k, b, d = samples.shape
    probs = probabilities(spec, samples.reshape(k * b, d), x).reshape(k, b, x.shape[0], -1).mean(0)
    picked = probs.gather(2, y.view(1, -1, 1).expand(b, -1, 1)).squeeze(-1)
    return -torch.log(picked.clamp_min(1e-12)).mean(1)


def meta_losses(phi_rows: torch.Tensor, task: Task, cfg: MetaConfig, generator: torch.Generator,
                groups: int) -> torch.Tensor:
    """Normalised BMA NLL on the validation split for every row of ``phi_rows`` [M, P]; rows b and
    b + groups share their randomness."""
    m = phi_rows.shape[0]
    theta0 = task.spec.init(groups, generator, task.x_train.device).repeat(m // groups, 1)
    steps = thinned_steps(cfg.unroll, cfg.unroll - cfg.sample_window, cfg.samples)
    with torch.no_grad():
        samples = run_chains(task.spec, task.x_train, task.y_train, theta0, cfg.kinetic(phi_rows, task.spec),
                             cfg.dynamics(task.x_train.shape[0]), cfg.unroll, cfg.batch_size, steps, generator,
                             groups=groups)
        nll = bma_nll(task.spec, samples, task.x_val, task.y_val) / math.log(task.n_classes)
    return torch.nan_to_num(nll, nan=cfg.loss_cap, posinf=cfg.loss_cap).clamp(max=cfg.loss_cap)


def antithetic_es_gradient(loss_fn: Callable[[torch.Tensor, int], torch.Tensor], phi: torch.Tensor,
                           sigma: float, pairs: int, generator: torch.Generator):
    """(gradient estimate, mean loss) of ``loss_fn(rows [2P, n], groups=P) -> [2P]`` at ``phi``."""
    e = torch.randn(pairs, phi.numel(), generator=generator, device=generator.device).to(phi.device)
    rows = torch.cat([phi + sigma * e, phi - sigma * e])
    losses = loss_fn(rows, pairs)
    delta = (losses[:pairs] - losses[pairs:]) / (2 * sigma)
    return (delta.unsqueeze(1) * e).mean(0), float(losses.mean())


class MetaTrainer:
    """phi and its Adam state; ``step(task)`` is one outer iteration."""

    def __init__(self, cfg: MetaConfig, seed: int, device=None):
        self.cfg = cfg
        init_gen = torch.Generator().manual_seed(seed)
        self.phi = init_kinetic_net(cfg.hidden, init_gen).to(device).requires_grad_(True)
        self.opt = torch.optim.Adam([self.phi], lr=cfg.lr)
        self.generator = torch.Generator(device=device or "cpu").manual_seed(seed + 1)

    def state(self) -> dict:
        return {"phi": self.phi.detach().cpu().clone(), "adam": self.opt.state_dict()}

    def load(self, state: dict, seed: int) -> None:
        """Continue from another trainer's ``state()`` with fresh randomness seeded by ``seed``."""
        with torch.no_grad():
            self.phi.copy_(state["phi"])
        self.opt.load_state_dict(state["adam"])
        self.generator.manual_seed(seed)

    def step(self, task: Task) -> float:
        grad, loss = antithetic_es_gradient(
            lambda rows, groups: meta_losses(rows, task, self.cfg, self.generator, groups),
            self.phi.detach(), self.cfg.sigma, self.cfg.pairs, self.generator)
        self.phi.grad = grad
        torch.nn.utils.clip_grad_norm_([self.phi], self.cfg.clip)
        self.opt.step()
        return loss

    def validation_score(self, tasks: list[Task], seed: int) -> float:
        """Mean normalised BMA NLL over fixed tasks with fixed randomness (the meta-validation curve)."""
        return meta_validation_score(self.phi.detach(), tasks, self.cfg, seed)


def meta_validation_score(phi: torch.Tensor, tasks: list[Task], cfg: MetaConfig, seed: int) -> float:
    scores = []
    for i, task in enumerate(tasks):
        gen = torch.Generator(device=task.x_train.device).manual_seed(seed + i)
        scores.append(float(meta_losses(phi.unsqueeze(0), task, cfg, gen, groups=1)[0]))
    return sum(scores) / len(scores)
