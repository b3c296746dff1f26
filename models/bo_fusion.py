"""BOMF: model fusion through Bayesian optimisation in language-model fine-tuning (Jang et al., NeurIPS 2024).

The method in three steps, each a few functions below:

1. Stage 1 (Sec. 4.2): Bayesian optimisation of (log learning rate, batch size) on a lightweight proxy
   (lower layers frozen or a low LoRA rank); objective = best validation metric of the run.
   `SingleTaskGP` + `qLogExpectedImprovement` (`maximise_single_objective`).
2. Stage 2: fine-tune the full model at a constant learning rate and keep K checkpoints along the
   trajectory (`finetune_collect`).
3. Fusion (Sec. 4.3): α ∈ [0,1]^K, w = α / Σα (`simplex_weights`), θ(w) = Σ_k w_k θ_k
   (`fuse_parameters`) evaluated with `torch.func.functional_call` on stacked checkpoints
   (`FusedClassifier`); two objectives (validation metric, negative validation loss), each min-max
   normalised over the members; independent GPs (`ModelListGP`) + qNEHVI (`maximise_two_objectives`);
   the final pick is the evaluated point with the best validation metric.

Baselines (Sec. 5): best single checkpoint, last checkpoint, uniform average (SWA-like), greedy soup
(`greedy_soup`), and single-objective BO fusion on the metric or the loss alone.

Everything here is pure torch/botorch: no files, no tracking, no orchestration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# Fusion weights and fused parameters (Sec. 4.3)


def simplex_weights(alpha: Tensor) -> Tensor:
    """w = α / Σα over the last dimension; α = 0 (undefined ratio) falls back to uniform weights."""
    if torch.any(alpha < 0):
        raise ValueError("fusion coefficients alpha must be non-negative")
    total = alpha.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(alpha, 1.0 / alpha.shape[-1])
    return torch.where(total > 0, alpha / total.clamp_min(torch.finfo(alpha.dtype).tiny), uniform)


def stack_checkpoints(checkpoints: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """K state dicts (same keys and shapes) -> one dict of tensors with a leading K axis."""
    if len(checkpoints) < 2:
        raise ValueError(f"fusion needs at least K=2 checkpoints, got {len(checkpoints)}")
    keys = list(checkpoints[0])
    for i, ckpt in enumerate(checkpoints[1:], start=1):
        if list(ckpt) != keys:
            raise ValueError(f"checkpoint {i} has different parameter names than checkpoint 0")
    return {k: torch.stack([c[k].detach().float() for c in checkpoints]) for k in keys}


def fuse_parameters(stacked: dict[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
    """θ(w) = Σ_k w_k θ_k for every stacked tensor (weights: shape (K,), already on the simplex)."""
    out = {}
    for name, theta in stacked.items():
        if theta.shape[0] != weights.shape[0]:
            raise ValueError(f"{name}: {theta.shape[0]} checkpoints but {weights.shape[0]} weights")
        out[name] = torch.tensordot(weights.to(theta.dtype), theta, dims=1)
    return out


# ----------------------------------------------------------------------------------------------------
# Classification metric and loss of a model under given parameters


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class absent from both pred and target scores 0)."""
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(sum(f1s) / num_classes)


@dataclass
class TextBatches:
    """A split: `inputs` (N, T) token ids, or (N, T, H) hidden states cached below the trained layers,
    `attention_mask` (N, T) and `labels` (N,). Models are called as `model(inputs, attention_mask)`."""

    inputs: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def chunks(self, batch_size: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        """Mini-batches of examples of similar length (sorted by length), each cut after its last
        non-padding column: trailing padding changes no logit, and it is ~30% of the tokens here."""
        order = torch.argsort(self.attention_mask.sum(-1), stable=True)
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            mask = self.attention_mask[idx]
            used = mask.any(0).nonzero()
            end = int(used.max()) + 1 if used.numel() else mask.shape[1]
            yield self.inputs[idx][:, :end], mask[:, :end], self.labels[idx]


def logits_of(model: nn.Module, out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(model: nn.Module, data: TextBatches, params: dict[str, Tensor] | None = None,
             batch_size: int = 256) -> tuple[float, float]:
    """(macro-F1, mean cross-entropy) of `model` on `data`, with `params` substituted when given."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, mask, y in data.chunks(batch_size):
        if params is None:
            out = model(x, mask)
        else:
            out = torch.func.functional_call(model, params, (x, mask), strict=False)
        logits.append(logits_of(model, out).float())
        labels.append(y)
    model.train(was_training)
    z, y = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(z, y).item()
    return macro_f1(z.argmax(-1), y, z.shape[-1]), loss


class FusedClassifier:
    """Evaluates Σ_k w_k θ_k without reloading: the K checkpoints of the trainable parameters are stacked
    once; the fused tensors replace them in `model` through `torch.func.functional_call`."""

    def __init__(self, model: nn.Module, checkpoints: Sequence[dict[str, Tensor]]):
        self.model = model
        self.stacked = stack_checkpoints(checkpoints)
        self.k = len(checkpoints)
        names = dict(model.named_parameters())
        missing = [n for n in self.stacked if n not in names]
        if missing:
            raise ValueError(f"checkpoint parameters not in the model: {missing[:3]}")

    def params(self, weights: Tensor) -> dict[str, Tensor]:
        return fuse_parameters(self.stacked, weights)

    def evaluate(self, weights: Tensor, data: TextBatches, batch_size: int = 256) -> tuple[float, float]:
        return evaluate(self.model, data, self.params(weights), batch_size)


def min_max_normalise(value: float, low: float, high: float) -> float:
    """(value − low) / (high − low); a zero range maps to value − low (no division by zero)."""
    span = high - low
    return (value - low) / span if span > 0 else value - low


class TopLayersClassifier(nn.Module):
    """The top of a BERT-style `*ForSequenceClassification` model: encoder layers from `n_frozen` on, the
    pooler and the head, run on hidden states cached after the frozen lower layers (a CPU-scale speed-up:
    the frozen part is computed once per example instead of at every step and every fused evaluation).
    With n_frozen equal to the number of layers only the pooler and the head run.
    Shares its modules with `hf_model`, so LoRA adapters injected there are part of it."""

    def __init__(self, hf_model: nn.Module, n_frozen: int):
        super().__init__()
        base = getattr(hf_model, hf_model.base_model_prefix)
        layers = base.encoder.layer
        if not 0 < n_frozen <= len(layers):
            raise ValueError(f"n_frozen must be in 1..{len(layers)}, got {n_frozen}")
        self.n_frozen = n_frozen
        self.layers = nn.ModuleList(layers[n_frozen:])
        self.pooler = base.pooler
        self.dropout = hf_model.dropout
        self.classifier = hf_model.classifier

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(self.pooler(hidden)))


@torch.no_grad()
def frozen_features(hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_frozen: int,
                    batch_size: int = 256, start: tuple[Tensor, int] | None = None) -> Tensor:
    """Hidden states after the embeddings and the first `n_frozen` encoder layers (only those layers
    run: the layers above are what `TopLayersClassifier` trains). `start` = (hidden states after the
    first m layers, m) continues from features already computed for a lower cut."""
    base = getattr(hf_model, hf_model.base_model_prefix)
    base.eval()
    first = 0 if start is None else start[1]
    if not 0 <= first <= n_frozen:
        raise ValueError(f"cannot continue from layer {first} to {n_frozen}")
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        mask = attention_mask[i:i + batch_size]
        hidden = base.embeddings(input_ids=input_ids[i:i + batch_size]) if start is None \
            else start[0][i:i + batch_size]
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in base.encoder.layer[first:n_frozen]:
            o = layer(hidden, attention_mask=additive)
            hidden = o[0] if isinstance(o, tuple) else o
        out.append(hidden)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# Stage 2: fine-tuning at a constant learning rate, collecting checkpoints


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class FinetuneResult:
    checkpoints: list[dict[str, Tensor]]
    checkpoint_steps: list[int]
    val_curve: list[tuple[int, float, float]]  # (step, macro-F1, loss)
    best_val_metric: float


def finetune_collect(
    model: nn.Module,
    train: TextBatches,
    val: TextBatches | None,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    eval_every: int = 0,
    checkpoint_steps: Sequence[int] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """AdamW, linear warm-up then constant learning rate (the paper's schedule), shuffled mini-batches
    from a seeded generator; evaluates `val` every `eval_every` steps and keeps the trainable parameters
    at each step in `checkpoint_steps`."""
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError("steps, batch_size and lr must be positive")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    order = torch.randperm(n, generator=gen)
    pos = 0
    keep = set(checkpoint_steps)
    result = FinetuneResult([], [], [], -math.inf)
    model.train()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        out = model(train.inputs[idx], train.attention_mask[idx])
        loss = F.cross_entropy(logits_of(model, out).float(), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
        if val is not None and eval_every and (step % eval_every == 0 or step == steps):
            f1, vloss = evaluate(model, val)
            result.val_curve.append((step, f1, vloss))
            result.best_val_metric = max(result.best_val_metric, f1)
        if step in keep:
            result.checkpoints.append(trainable_state(model))
            result.checkpoint_steps.append(step)
    return result


def checkpoint_window(reference_step: int, k: int, start: float, end: float) -> list[int]:
    """K evenly spaced steps from start·reference to end·reference (the paper: 0.5× to 2× the
    early-stopping step, every 50 steps)."""
    if k < 2:
        raise ValueError(f"need K >= 2 checkpoints, got {k}")
    if not 0 < start < end:
        raise ValueError("need 0 < start < end for the checkpoint window")
    lo, hi = start * reference_step, end * reference_step
    steps = sorted({max(1, round(lo + i * (hi - lo) / (k - 1))) for i in range(k)})
    if len(steps) < k:
        raise ValueError(f"window {lo:.0f}..{hi:.0f} too short for {k} distinct checkpoints")
    return steps


# ----------------------------------------------------------------------------------------------------
# Bayesian optimisation loops (botorch)


@dataclass
class BOTrace:
    """Everything a BO run evaluated, plus where its time went."""

    X: Tensor  # (n, d) evaluated inputs in the original bounds
    Y: Tensor  # (n, m) objective values (maximised)
    n_initial: int
    hypervolume: list[float] = field(default_factory=list)  # after each evaluation from n_initial on
    model_seconds: float = 0.0  # GP fitting + acquisition optimisation
    eval_seconds: float = 0.0  # objective evaluations


@dataclass
class AcquisitionBudget:
    num_restarts: int = 4
    raw_samples: int = 128
    mc_samples: int = 64
    maxiter: int = 100
    fit_maxiter: int | None = None  # L-BFGS iterations of the GP hyperparameter fit (None: botorch's)

    def fit(self, mll) -> None:
        from botorch.fit import fit_gpytorch_mll

        kw = {} if self.fit_maxiter is None else {"optimizer_kwargs": {"options": {"maxiter": self.fit_maxiter}}}
        fit_gpytorch_mll(mll, **kw)


def _check_bo_args(bounds: Tensor, n_initial: int, n_iterations: int) -> None:
    if bounds.ndim != 2 or bounds.shape[0] != 2 or bounds.shape[1] == 0:
        raise ValueError("bounds must have shape (2, d) with d >= 1 (empty search space)")
    if torch.any(bounds[1] <= bounds[0]):
        raise ValueError(f"every upper bound must exceed its lower bound, got {bounds.tolist()}")
    if n_initial < 1 or n_iterations < 0:
        raise ValueError("need n_initial >= 1 and n_iterations >= 0")


def sobol_points(bounds: Tensor, n: int, seed: int) -> Tensor:
    from botorch.utils.sampling import draw_sobol_samples

    return draw_sobol_samples(bounds=bounds, n=n, q=1, seed=seed).squeeze(1)


def _fit_gp(X: Tensor, y: Tensor, bounds: Tensor):
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize

    return SingleTaskGP(X, y, input_transform=Normalize(d=X.shape[-1], bounds=bounds),
                        outcome_transform=Standardize(m=1))


def maximise_single_objective(
    objective: Callable[[Tensor], float],
    bounds: Tensor,
    *,
    n_initial: int,
    n_iterations: int,
    seed: int,
    budget: AcquisitionBudget | None = None,
    initial_X: Tensor | None = None,
    round_input: Callable[[Tensor], Tensor] | None = None,
) -> BOTrace:
    """SingleTaskGP + qLogExpectedImprovement (best_f = best observed value), Sobol initial design.
    Used for stage-1 hyperparameter search and for the metric-only / loss-only fusion ablations."""
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    bounds = bounds.double()
    _check_bo_args(bounds, n_initial, n_iterations)
    budget = budget or AcquisitionBudget()
    rnd = round_input or (lambda x: x)
    X0 = initial_X.double() if initial_X is not None else sobol_points(bounds, n_initial, seed)
    xs, ys = [], []
    trace = BOTrace(torch.empty(0), torch.empty(0), n_initial=len(X0))
    for x in X0:
        x = rnd(x)
        t = time.perf_counter()
        ys.append(float(objective(x)))
        trace.eval_seconds += time.perf_counter() - t
        xs.append(x)
    torch.manual_seed(seed)
    for _ in range(n_iterations):
        t = time.perf_counter()
        X, Y = torch.stack(xs), torch.tensor(ys, dtype=torch.double).unsqueeze(-1)
        gp = _fit_gp(X, Y, bounds)
        budget.fit(ExactMarginalLogLikelihood(gp.likelihood, gp))
        acq = qLogExpectedImprovement(gp, best_f=Y.max(),
                                      sampler=SobolQMCNormalSampler(torch.Size([budget.mc_samples]), seed=seed))
        cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=budget.num_restarts,
                                raw_samples=budget.raw_samples, options={"maxiter": budget.maxiter})
        x = rnd(cand.detach().squeeze(0))
        trace.model_seconds += time.perf_counter() - t
        t = time.perf_counter()
        ys.append(float(objective(x)))
        trace.eval_seconds += time.perf_counter() - t
        xs.append(x)
    trace.X, trace.Y = torch.stack(xs), torch.tensor(ys, dtype=torch.double).unsqueeze(-1)
    return trace


def hypervolume(Y: Tensor, ref_point: Tensor) -> float:
    """Dominated hypervolume of the points Y (maximisation) above `ref_point`."""
    from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning

    return float(DominatedPartitioning(ref_point=ref_point.double(), Y=Y.double()).compute_hypervolume())


def pareto_mask(Y: Tensor) -> Tensor:
    from botorch.utils.multi_objective.pareto import is_non_dominated

    return is_non_dominated(Y)


def maximise_two_objectives(
    objective: Callable[[Tensor], Sequence[float]],
    bounds: Tensor,
    ref_point: Sequence[float],
    *,
    n_initial: int,
    n_iterations: int,
    seed: int,
    budget: AcquisitionBudget | None = None,
    initial_X: Tensor | None = None,
) -> BOTrace:
    """Multi-objective BO: one SingleTaskGP per objective in a ModelListGP (fitted jointly through
    SumMarginalLogLikelihood) + qLogNoisyExpectedHypervolumeImprovement (the numerically stable form of
    the paper's qNEHVI) with the evaluated inputs as the noisy baseline. Hypervolume is recorded after
    every evaluation."""
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.models import ModelListGP
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import SumMarginalLogLikelihood

    bounds = bounds.double()
    _check_bo_args(bounds, n_initial, n_iterations)
    budget = budget or AcquisitionBudget()
    ref = torch.as_tensor(ref_point, dtype=torch.double)
    X0 = initial_X.double() if initial_X is not None else sobol_points(bounds, n_initial, seed)
    xs, ys = [], []
    trace = BOTrace(torch.empty(0), torch.empty(0), n_initial=len(X0))

    def run(x: Tensor) -> None:
        t = time.perf_counter()
        y = torch.as_tensor([float(v) for v in objective(x)], dtype=torch.double)
        trace.eval_seconds += time.perf_counter() - t
        if y.shape != ref.shape:
            raise ValueError(f"objective returned {y.shape[0]} values for {ref.shape[0]} reference coordinates")
        xs.append(x)
        ys.append(y)

    for x in X0:
        run(x)
    trace.hypervolume.append(hypervolume(torch.stack(ys), ref))
    torch.manual_seed(seed)
    for _ in range(n_iterations):
        t = time.perf_counter()
        X, Y = torch.stack(xs), torch.stack(ys)
        gps = [_fit_gp(X, Y[:, i:i + 1], bounds) for i in range(Y.shape[1])]
        model = ModelListGP(*gps)
        budget.fit(SumMarginalLogLikelihood(model.likelihood, model))
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model, ref_point=ref, X_baseline=X, prune_baseline=True,
            sampler=SobolQMCNormalSampler(torch.Size([budget.mc_samples]), seed=seed))
        cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=budget.num_restarts,
                                raw_samples=budget.raw_samples, options={"maxiter": budget.maxiter})
        trace.model_seconds += time.perf_counter() - t
        run(cand.detach().squeeze(0))
        trace.hypervolume.append(hypervolume(torch.stack(ys), ref))
    trace.X, trace.Y = torch.stack(xs), torch.stack(ys)
    return trace


# ----------------------------------------------------------------------------------------------------
# Greedy soup baseline (Wortsman et al., 2022)


def greedy_soup(val_metric_of: Callable[[Tensor], float], member_metrics: Sequence[float]) -> tuple[Tensor, float]:
    """Visit members by decreasing validation metric; add one to the uniform soup when the soup's metric
    does not drop. Returns the soup's simplex weights and its validation metric."""
    k = len(member_metrics)
    if k < 2:
        raise ValueError("greedy soup needs K >= 2 members")
    order = sorted(range(k), key=lambda i: -member_metrics[i])
    chosen = [order[0]]
    best = member_metrics[order[0]]

    def weights(members: list[int]) -> Tensor:
        w = torch.zeros(k)
        w[members] = 1.0 / len(members)
        return w

    for i in order[1:]:
        score = val_metric_of(weights(chosen + [i]))
        if score >= best:
            chosen.append(i)
            best = score
    return weights(chosen), best
