"""Claims decided by confidence intervals, or by nothing.

A claim is a named comparison with a sign convention: its *effect* (a paired difference, a ratio, ...)
is computed per seed, or per test example within each seed, and summarised by its mean with a 95%
confidence interval. The margin is fixed in params.yaml before the run. The verdict is

* ``True``  when the whole CI lies beyond the margin in the claimed direction
  (``direction=">"``: ``ci_low > margin``; ``direction="<"``: ``ci_high < margin``);
* ``False`` when it does not (the CI lies on the other side of the margin, or straddles it);
* ``None``  ("untestable") when a precondition gate failed, or when there are too few seeds for a CI;
  the claim then carries the reason.

Two estimators:

* :func:`per_seed` - one number per seed (e.g. a seed's accuracy difference): the mean over seeds and
  a Student-t interval (``n - 1`` degrees of freedom);
* :func:`per_example` - paired per-example differences for each seed (e.g. NLL of method A minus
  method B on each test example): the mean over seeds of the per-seed means, with a two-level
  percentile bootstrap (seeds with replacement, then examples with replacement within each seed), so
  that both the seed spread and the finite test set enter the interval.

:func:`all_of` joins parts that must all hold (e.g. one per sampler). :func:`payload` gives the
``claims`` / ``claims_detail`` / ``gates`` objects of ``results/<paper>/metrics.json`` (lean: effect,
CI, margin, direction, n, and the gate and reason of an untestable claim) and their long form for
``evidence.json`` (statements, estimators, every part of an ``all_of``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

DIRECTIONS = (">", "<")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Gate:
    """A precondition: ``value`` must be ``direction`` (``>=`` or ``<=``) ``threshold``."""

    name: str
    value: float
    threshold: float
    direction: str = ">="
    description: str = ""

    def __post_init__(self):
        if self.direction not in (">=", "<="):
            raise ValueError(f"gate direction must be '>=' or '<=', got {self.direction!r}")

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.direction == ">=" else self.value <= self.threshold

    def to_dict(self) -> dict:
        return {"value": _num(self.value), "threshold": _num(self.threshold), "direction": self.direction,
                "passed": self.passed}


def gate(name: str, value: float, threshold: float, direction: str = ">=", description: str = "") -> Gate:
    return Gate(name, float(value), float(threshold), direction, description)


@dataclass(frozen=True)
class Claim:
    name: str
    effect: float
    ci: tuple[float, float]
    margin: float
    direction: str
    n: int
    verdict: bool | None
    method: str
    statement: str = ""
    gate: str | None = None
    reason: str | None = None
    parts: dict[str, "Claim"] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The lean entry of metrics.json's ``claims_detail``: enough to re-derive the verdict."""
        out = {"effect": _num(self.effect), "ci": [_num(self.ci[0]), _num(self.ci[1])],
               "margin": _num(self.margin), "direction": self.direction, "n": self.n}
        if self.parts:
            out["weakest_part"] = self.weakest
        if self.verdict is None:
            out["gate"] = self.gate
            out["reason"] = self.reason
        return out

    def explain(self) -> dict:
        """The long form for evidence.json: statement, estimator, verdict and every part."""
        out = {"statement": self.statement, "method": self.method, "verdict": self.verdict, **self.to_dict()}
        if self.parts:
            out["parts"] = {k: v.explain() for k, v in self.parts.items()}
        return out

    @property
    def weakest(self) -> str | None:
        return min(self.parts, key=lambda k: _slack(self.parts[k])) if self.parts else None


def _num(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def verdict_of(ci: tuple[float, float], margin: float, direction: str) -> bool:
    """True when the CI lies wholly beyond ``margin`` in ``direction``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be '>' or '<', got {direction!r}")
    low, high = ci
    return bool(low > margin) if direction == ">" else bool(high < margin)


def _gated(name: str, effect: float, ci, margin: float, direction: str, n: int, method: str,
           statement: str, gates: Iterable[Gate], min_n: int) -> Claim:
    failed = [g for g in gates if not g.passed]
    if failed:
        g = failed[0]
        reason = (f"gate '{g.name}' failed: {g.value:.4g} is not {g.direction} {g.threshold:.4g}"
                  + (f" ({g.description})" if g.description else ""))
        return Claim(name, effect, ci, margin, direction, n, None, method, statement, g.name, reason)
    if n < min_n:
        return Claim(name, effect, ci, margin, direction, n, None, method, statement, None,
                     f"n = {n}: a confidence interval needs at least {min_n} seeds")
    return Claim(name, effect, ci, margin, direction, n, verdict_of(ci, margin, direction), method,
                 statement)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of ``values`` (n - 1 degrees of freedom)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def per_seed(name: str, values: Sequence[float], *, margin: float, direction: str = ">",
             statement: str = "", gates: Iterable[Gate] = ()) -> Claim:
    """A claim on one number per seed (a paired difference, a ratio, ...): mean and t-interval."""
    mean, low, high = t_interval(values)
    return _gated(name, mean, (low, high), float(margin), direction, len(values), "t over seeds",
                  statement, gates, min_n=2)


def bootstrap_mean(per_seed_values: Sequence[np.ndarray], *, n_boot: int = 2000, rng_seed: int = 0,
                   confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the mean over seeds of per-example means, by a two-level bootstrap.

    Seeds are resampled with replacement (when there are at least two), then examples with
    replacement within each drawn seed; the interval is the percentile interval of the resampled means.
    """
    groups = [np.asarray(g, dtype=float).ravel() for g in per_seed_values]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("per_example needs at least one non-empty array of per-example values")
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(rng_seed)
    k = len(groups)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, k, size=k) if k > 1 else np.zeros(1, dtype=int)
        stats[b] = np.mean([groups[s][rng.integers(0, groups[s].size, size=groups[s].size)].mean()
                            for s in seeds])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return mean, float(low), float(high)


def per_example(name: str, diffs_by_seed: Sequence[np.ndarray], *, margin: float, direction: str = ">",
                statement: str = "", gates: Iterable[Gate] = (), n_boot: int = 2000,
                rng_seed: int = 0) -> Claim:
    """A claim on paired per-example differences (one array per seed): two-level bootstrap CI."""
    mean, low, high = bootstrap_mean(diffs_by_seed, n_boot=n_boot, rng_seed=rng_seed)
    return _gated(name, mean, (low, high), float(margin), direction, len(diffs_by_seed),
                  "bootstrap over seeds and examples", statement, gates, min_n=1)


def _slack(c: Claim) -> float:
    """How far the CI lies beyond the margin (negative: short of it; -inf: no CI)."""
    low, high = c.ci
    edge = low - c.margin if c.direction == ">" else c.margin - high
    return edge if math.isfinite(edge) else -math.inf


def all_of(name: str, parts: dict[str, Claim], statement: str = "") -> Claim:
    """A claim that holds when every part holds, untestable when any part is.

    Its effect, CI and margin are those of the weakest part (the one whose CI comes closest to, or lies
    furthest short of, its margin), so the verdict follows from them alone."""
    if not parts:
        raise ValueError(f"claim {name} has no parts")
    weakest = min(parts.values(), key=_slack)
    untestable = [c for c in parts.values() if c.verdict is None]
    if untestable:
        bad = untestable[0]
        verdict, reason, gate_name = None, f"part '{bad.name}': {bad.reason}", bad.gate
    else:
        verdict, reason, gate_name = all(c.verdict for c in parts.values()), None, None
    return Claim(name, weakest.effect, weakest.ci, weakest.margin, weakest.direction, weakest.n, verdict,
                 f"all of {len(parts)} parts (weakest shown)", statement, gate_name, reason, dict(parts))


def payload(claims: Iterable[Claim], gates: Iterable[Gate] = ()) -> tuple[dict, dict]:
    """(metrics, evidence): the lean ``claims``, ``claims_detail`` and ``gates`` objects of metrics.json,
    and their long form (statements, estimators, parts, gate descriptions) for evidence.json."""
    claims, gates = list(claims), list(gates)
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate claim names: {names}")
    metrics = {"claims": {c.name: c.verdict for c in claims},
               "claims_detail": {c.name: c.to_dict() for c in claims},
               "gates": {g.name: g.to_dict() for g in gates}}
    evidence = {"claims": {c.name: c.explain() for c in claims},
                "gates": {g.name: {**g.to_dict(), "description": g.description} for g in gates}}
    return metrics, evidence


def rederive(detail: dict) -> bool | None:
    """The verdict that a ``claims_detail`` entry's own numbers give (for tests and readers)."""
    if "reason" in detail or detail["ci"][0] is None or detail["ci"][1] is None:
        return None
    return verdict_of(tuple(detail["ci"]), detail["margin"], detail["direction"])
