"""Bayesian optimisation loops (botorch): single objective (stage 1 and the fusion ablations) and two
objectives (BOMF, Sec. 4.3)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


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
    """How hard each BO iteration works (every value comes from the stage's params)."""

    num_restarts: int
    raw_samples: int
    mc_samples: int   # quasi-MC samples of the acquisition function
    maxiter: int      # L-BFGS iterations of the acquisition optimisation
    fit_maxiter: int | None  # L-BFGS iterations of the GP hyperparameter fit (None: botorch's)

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
    budget: AcquisitionBudget,
    initial_X: Tensor | None = None,
    round_input: Callable[[Tensor], Tensor] | None = None,
) -> BOTrace:
    """SingleTaskGP + qLogExpectedImprovement (best_f = best observed value), Sobol initial design.
    Used for stage-1 hyperparameter search and for the metric-only / loss-only fusion ablations."""
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    use_pure_python_qlogehvi()
    bounds = bounds.double()
    _check_bo_args(bounds, n_initial, n_iterations)
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


def use_pure_python_qlogehvi() -> None:
    """Keep botorch's qLogNEHVI on its pure-PyTorch path.

    On first use, botorch (>= 0.17) JIT-compiles an optional fused C++ kernel with ``-march=native``
    into the user's shared torch-extensions cache, guarded by a lock *file*: a process killed while
    compiling (a cancelled stage, a timed-out test) leaves that file behind and every later process
    waits on it forever; two processes compiling at once wait on each other. It also makes the numbers
    depend on the compiler and CPU. Marking the load as already attempted makes botorch use the pure
    PyTorch implementation of the same acquisition value, the same on every machine."""
    from botorch.acquisition.multi_objective import logei

    if hasattr(logei, "_load_attempted"):
        logei._load_attempted = True
        logei._C = None


def maximise_two_objectives(
    objective: Callable[[Tensor], Sequence[float]],
    bounds: Tensor,
    ref_point: Sequence[float],
    *,
    n_initial: int,
    n_iterations: int,
    seed: int,
    budget: AcquisitionBudget,
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

    use_pure_python_qlogehvi()
    bounds = bounds.double()
    _check_bo_args(bounds, n_initial, n_iterations)
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
