"""evaluate: claims by confidence intervals over data splits x chains (paired by chain initialisation),
gates, headline table and plots from the sample stage's runs and the meta-training curves."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import Claim, all_of, gate, per_seed

METHODS = ("l2e", "l2e_untrained", "sghmc", "csghmc", "ensemble")


class EvaluateParams(Params):
    nll_margin: float = Field(description="L2E minus tuned cSGHMC BMA test NLL must lie below this")
    most_tasks: int = Field(ge=1, description="'most held-out tasks': at least this many task parts hold")
    metatraining_margin: float = Field(description="trained minus untrained L2E BMA NLL below this")
    disagreement_margin: float = Field(description="L2E minus cSGHMC disagreement above this")
    modes_margin: float = Field(description="L2E minus cSGHMC mode count above this")
    cost_ratio_margin: float = Field(gt=0, description="L2E / SGHMC time per step below this")
    multimodal_gate: float = Field(gt=0, description="deep-ensemble mode count at least this")
    accuracy_gate: float = Field(gt=0, lt=1, description="tuned cSGHMC mean BMA test accuracy at least this")


@dataclass(frozen=True)
class MostOf(Claim):
    """Holds when at least ``k`` parts hold; shows the k-th best part, so its verdict follows from the
    shown CI and margin alone."""

    shown: str = ""

    @property
    def weakest(self) -> str | None:
        return self.shown


def beyond_margin(c: Claim) -> float:
    """How far a claim's CI lies beyond its margin in the claimed direction (-inf without a CI)."""
    edge = c.ci[0] - c.margin if c.direction == ">" else c.margin - c.ci[1]
    return edge if math.isfinite(edge) else -math.inf


def most_of(name: str, parts: dict[str, Claim], k: int, statement: str = "") -> Claim:
    ranked = sorted(parts, key=lambda n: beyond_margin(parts[n]), reverse=True)
    shown = parts[ranked[min(k, len(ranked)) - 1]]
    untestable = [c for c in parts.values() if c.verdict is None]
    verdict = None if untestable else sum(bool(c.verdict) for c in parts.values()) >= k
    reason = f"part '{untestable[0].name}': {untestable[0].reason}" if untestable else None
    return MostOf(name, shown.effect, shown.ci, shown.margin, shown.direction, shown.n, verdict,
                  f"at least {k} of {len(parts)} parts (the {k}-th best shown)", statement,
                  untestable[0].gate if untestable else None, reason, dict(parts), shown.name)


def units(rows: list[dict], task: str | None, method: str, key: str) -> np.ndarray:
    """One value per split x chain (chains of the same index share their initialisation across methods)."""
    return np.array([c[key] for r in rows if task in (None, r["task"]) for c in r["methods"][method]["chains"]],
                    dtype=float)


def decide(rows: list[dict], timing: dict, p: EvaluateParams):
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    diff = lambda t, a, b, key: units(rows, t, a, key) - units(rows, t, b, key)
    gates = [gate("csghmc_accuracy", np.mean([units(rows, t, "csghmc", "acc").mean() for t in tasks]),
                  p.accuracy_gate, ">=", "tuned cSGHMC's BMA test accuracy, mean over held-out tasks"),
             gate("ensemble_modes", units(rows, None, "ensemble", "modes").mean(), p.multimodal_gate, ">=",
                  "deep-ensemble members' mode count by loss barriers: the posterior is multi-modal here")]
    nll_part = lambda t: per_seed(t, diff(t, "l2e", "csghmc", "nll"), margin=p.nll_margin, direction="<",
                                  gates=gates[:1], statement=f"{t}: L2E minus cSGHMC BMA test NLL")
    unseen = [t for t in tasks if any(r["unseen_architecture"] for r in rows if r["task"] == t)]
    claims = [
        most_of("l2e_beats_csghmc_nll", {t: nll_part(t) for t in tasks}, p.most_tasks,
                f"lower BMA test NLL than tuned cSGHMC on at least {p.most_tasks} of {len(tasks)} tasks"),
        all_of("metatraining_matters", {t: per_seed(t, diff(t, "l2e", "l2e_untrained", "nll"),
                                                    margin=p.metatraining_margin, direction="<",
                                                    statement=f"{t}: trained minus untrained L2E BMA NLL")
                                        for t in tasks}, "meta-trained L2E beats its untrained start"),
        all_of("l2e_explores", {
            "disagreement": per_seed("disagreement", diff(None, "l2e", "csghmc", "disagreement"),
                                     margin=p.disagreement_margin, gates=gates[1:],
                                     statement="L2E minus cSGHMC pairwise disagreement, all tasks"),
            "modes": per_seed("modes", diff(None, "l2e", "csghmc", "modes"), margin=p.modes_margin,
                              gates=gates[1:], statement="L2E minus cSGHMC mode count, all tasks")},
            "L2E's samples disagree more and sit in more modes than cSGHMC's"),
        all_of("transfers_to_unseen_architecture", {t: nll_part(t) for t in unseen},
               "the NLL win holds on the MLP absent from meta-training"),
        all_of("cost_per_step", {t: per_seed(t, np.array(v["l2e"]) / np.array(v["sghmc"]),
                                             margin=p.cost_ratio_margin, direction="<",
                                             statement=f"{t} ({v['weights']} weights): L2E / SGHMC s per step")
                                 for t, v in timing.items()}, "L2E's time per step within 3x SGHMC's"),
    ]
    return claims, gates


def summary(rows: list[dict]) -> dict:
    """Mean over splits x chains of every per-chain score, per task and method; mixing diagnostics."""
    out = {}
    for t in dict.fromkeys(r["task"] for r in rows):
        out[t] = {}
        for m in METHODS:
            keys = [k for k in rows[0]["methods"][m]["chains"][0] if k != "nll_vs_samples"]
            out[t][m] = {k: float(units(rows, t, m, k).mean()) for k in keys}
            out[t][m]["mixing"] = {k: float(np.mean([r["methods"][m]["mixing"][k] for r in rows
                                                     if r["task"] == t])) for k in rows[0]["methods"][m]["mixing"]}
    return out


@stage(params=EvaluateParams, inputs=("metatrain", "sample"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Claims (NLL vs tuned cSGHMC, meta-training, exploration, transfer, cost), gates, plots."""
    runs = io.read_json(ctx.input("sample") / "runs.json")
    trained = ctx.input("metatrain")
    meta, curves = io.read_json(trained / "meta.json"), io.read_json(trained / "curves.json")
    rows, timing = runs["rows"], runs["timing"]
    claims, gates = decide(rows, timing, p)
    table = summary(rows)
    ctx.write_metrics(claims, gates, headline=headline(table, timing, meta, curves), evidence={
        "table": table, "timing_seconds_per_step": timing, "metatrain": meta, "device": runs["device"],
        "tuned": {r["name"]: r["tuned"] for r in rows}, "grids": {r["name"]: r["grids"] for r in rows}})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})
    from .figures import write_figures

    write_figures(ctx, rows, curves, meta)


def headline(table: dict, timing: dict, meta: dict, curves: list[dict]) -> dict:
    pooled = lambda m, k: float(np.mean([table[t][m][k] for t in table]))
    train = [c for c in curves if c["multiplier"] == meta["multiplier"]]
    return {"bma_nll": {t: {m: table[t][m]["nll"] for m in ("l2e", "csghmc", "l2e_untrained")} for t in table},
            "bma_acc": {m: pooled(m, "acc") for m in ("l2e", "csghmc")},
            "disagreement": {m: pooled(m, "disagreement") for m in ("l2e", "csghmc", "ensemble")},
            "modes": {m: pooled(m, "modes") for m in ("l2e", "csghmc", "ensemble")},
            "time_ratio_l2e_over_sghmc": {t: float(np.mean(np.array(v["l2e"]) / np.array(v["sghmc"])))
                                          for t, v in timing.items()},
            "chosen_multiplier": meta["multiplier"],
            "meta_val": {"untrained": train[0]["score"], "final": train[-1]["score"]}}
