"""evaluate: test macro-F1 per method, the claims (95% CIs over seeds), the landscape / Pareto front /
hypervolume figures. Reads as load -> summarise -> claims -> write -> figures."""
from __future__ import annotations

import math

from pydantic import Field

from tasks.bo_fusion.outputs import FuseResult, FuseRun, HpoResult
from tasks.core import Params, StageContext, stage
from tasks.core.claims import Claim, Gate, all_of, gate, per_seed
from tasks.metrics import mean_std


class Margins(Params):
    bomf_beats: float = Field(description="'BOMF beats X' (and each part of multi_objective_beats_single): "
                              "the 95% CI of the per-seed paired difference of test macro-F1 (BOMF - X) "
                              "must lie above this")
    loss_metric_mismatch: float = Field(ge=-1, le=1, description="the 95% CI of the per-seed Spearman "
                                        "rho(val loss, val macro-F1) over the stage-2 checkpoints must lie "
                                        "above this (-1 = the loss ranks them perfectly)")
    hpo_transfers: float = Field(description="the 95% CI of the per-seed val macro-F1 of the full model at "
                                 "the proxy's lr minus that at the grid's best lr must lie above this")


class EvaluateParams(Params):
    majority_margin: float = Field(ge=-1, le=1, description="gates: on every seed the early-stopped stage-2 "
                                   "model (and the best grid run of the transfer check) beats the val macro-F1 "
                                   "of always predicting the majority class by at least this much")
    margins: Margins


METHODS = ("bomf", "best_checkpoint", "last_checkpoint", "uniform_average", "greedy_soup",
           "metric_only_bo", "loss_only_bo")
BEATS = {"bomf_beats_best_checkpoint": "best_checkpoint", "bomf_beats_swa": "uniform_average",
         "bomf_beats_greedy_soup": "greedy_soup"}


# -------------------------------------------------------------------------------------------- load
def load(ctx: StageContext) -> tuple[HpoResult, FuseResult]:
    return (HpoResult.read(ctx.input("hpo") / "hpo.json"), FuseResult.read(ctx.input("fuse") / "fuse.json"))


# --------------------------------------------------------------------------------------- summarise
def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho; 0 when either side is constant (a flat metric says nothing about the loss)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def runs_of(fz: FuseResult, variant: str) -> list[FuseRun]:
    return sorted((r for r in fz.runs.values() if r.variant == variant), key=lambda r: r.seed)


def summarise_variant(runs: list[FuseRun]) -> dict:
    """Means over seeds, per-seed numbers and the landscape statistics of one variant."""
    def ms(values) -> dict:
        return {**mean_std(values), "n": len(values)}

    table = {m: {key: ms([getattr(r.methods[m], key) for r in runs])
                 for key in ("test_f1", "val_f1", "test_loss", "val_loss")} for m in METHODS}
    landscape_rho = [spearman([pt.loss for pt in r.landscape], [pt.f1 for pt in r.landscape]) for r in runs]
    return {
        "seeds": [r.seed for r in runs],
        "table": table,
        "per_seed_test_f1": {m: [r.methods[m].test_f1 for r in runs] for m in METHODS},
        "checkpoint_spearman_loss_vs_f1": [spearman([c.loss for c in r.members_val], [c.f1 for c in r.members_val])
                                           for r in runs],
        "best_checkpoint_val_f1": [max(c.f1 for c in r.members_val) for r in runs],
        "early_stop_val_f1": [r.early_stop_val_f1 for r in runs],
        "majority_val_f1": [r.majority_val_f1 for r in runs],
        "best_step": [r.best_step for r in runs],
        "checkpoint_steps": [[c.step for c in r.members_val] for r in runs],
        "landscape_spearman_loss_vs_f1": landscape_rho,
        "loss_best_differs_from_f1_best": [min(r.landscape, key=lambda pt: pt.loss) is not
                                           max(r.landscape, key=lambda pt: pt.f1) for r in runs],
        "bomf_minus": {m: table["bomf"]["test_f1"]["mean"] - table[m]["test_f1"]["mean"] for m in METHODS[1:]},
        "timing": {"bomf_gp_and_acquisition_seconds": ms([r.timing.bomf_model_seconds for r in runs]),
                   "bomf_evaluation_seconds": ms([r.timing.bomf_eval_seconds for r in runs]),
                   "val_evaluations_per_seed": ms([r.timing.val_evaluations for r in runs])},
        "initial_hypervolume": ms([r.hypervolume[0] for r in runs]),
        "final_hypervolume": ms([r.hypervolume[-1] for r in runs]),
    }


def summarise_transfer(hpo: HpoResult) -> dict | None:
    """Per seed: the full model's val macro-F1 at the proxy's lr and at the grid's best lr."""
    full = hpo.variants.get("full")
    if full is None or full.transfer is None:
        return None
    tr = full.transfer
    grid_best = [max(g.best_val_f1 for g in tr.grid if g.seed == s) for s in tr.seeds]
    return {"chosen_lr": full.chosen.lr, "chosen_batch_size": full.chosen.batch_size, "seeds": tr.seeds,
            "majority_val_f1": tr.majority_val_f1,
            "val_f1_at_chosen": [a.best_val_f1 for a in tr.at_chosen], "grid_best_val_f1": grid_best,
            "grid_best_lr": [max((g for g in tr.grid if g.seed == s), key=lambda g: g.best_val_f1).lr
                             for s in tr.seeds],
            "grid": [g.model_dump() for g in tr.grid]}


# ------------------------------------------------------------------------------------------ claims
def fusion_claims(per_seed_test_f1: dict[str, list[float]], checkpoint_rho: list[float],
                  gain_over_majority: list[float], p: EvaluateParams) -> tuple[list[Claim], Gate]:
    """The fusion claims on one variant's seeds (lists aligned by seed); `gain_over_majority`: per seed,
    the early-stopped model's val macro-F1 minus that of always predicting the majority class."""
    learned = gate("members_learn", min(gain_over_majority), p.majority_margin, ">=",
                   "lowest over seeds of the early-stopped stage-2 model's val macro-F1 minus the "
                   "majority class's")

    def beats(name: str, other: str) -> Claim:
        diffs = [b - o for b, o in zip(per_seed_test_f1["bomf"], per_seed_test_f1[other])]
        return per_seed(name, diffs, margin=p.margins.bomf_beats, direction=">", gates=[learned],
                        statement=f"test macro-F1 of BOMF minus {other}, paired by seed")

    claims = [per_seed("loss_metric_mismatch", checkpoint_rho, margin=p.margins.loss_metric_mismatch, direction=">",
                       gates=[learned], statement="Spearman rho(val loss, val macro-F1) over the K stage-2 "
                       "checkpoints per seed lies above the margin (-1: the loss ranks them perfectly)")]
    claims += [beats(name, other) for name, other in BEATS.items()]
    claims.append(all_of("multi_objective_beats_single",
                         {"vs_metric_only_bo": beats("vs_metric_only_bo", "metric_only_bo"),
                          "vs_loss_only_bo": beats("vs_loss_only_bo", "loss_only_bo")},
                         statement="BOMF beats both single-objective BO fusions"))
    return claims, learned


def transfer_claim(val_f1_at_chosen: list[float], grid_best_val_f1: list[float], majority_val_f1: float,
                   p: EvaluateParams) -> tuple[Claim, Gate]:
    grid_learns = gate("grid_learns", min(grid_best_val_f1) - majority_val_f1, p.majority_margin, ">=",
                       "lowest over seeds of the full model's best val macro-F1 on the lr grid minus the "
                       "majority class's")
    diffs = [c - g for c, g in zip(val_f1_at_chosen, grid_best_val_f1)]
    return per_seed("hpo_transfers", diffs, margin=p.margins.hpo_transfers, direction=">", gates=[grid_learns],
                    statement="full-model val macro-F1 at the proxy's lr minus at the grid's best lr, per seed"), \
        grid_learns


# ------------------------------------------------------------------------------------------- write
def write(ctx: StageContext, claims: list[Claim], gates: list[Gate], summary: dict, transfer: dict | None,
          hpo: HpoResult, fz: FuseResult, main: str) -> None:
    headline = {"test_macro_f1": {v: {m: s["table"][m]["test_f1"]["mean"] for m in METHODS}
                                  for v, s in summary.items()},
                "final_hypervolume": {v: s["final_hypervolume"]["mean"] for v, s in summary.items()}}
    evidence = {"variant_for_claims": main, "variants": summary, "hpo_transfer": transfer,
                "hpo_chosen": {v: r.chosen.model_dump() for v, r in hpo.variants.items()},
                "hpo_seconds": {v: {"total": r.seconds, "gp_and_acquisition": r.bo_model_seconds,
                                    "proxy_runs": r.bo_eval_seconds} for v, r in hpo.variants.items()},
                "checkpoint_steps": {tag: [c.step for c in r.members_val] for tag, r in fz.runs.items()}}
    ctx.write_metrics(claims, gates, headline=headline, evidence=evidence)
    ctx.log_metrics({f"{v}_{m}_test_f1": s["table"][m]["test_f1"]["mean"] for v, s in summary.items() for m in METHODS})
    ctx.log_metrics({f"claim_{c.name}_effect": c.effect for c in claims if math.isfinite(c.effect)})


# ----------------------------------------------------------------------------------------- figures
def write_figures(ctx: StageContext, fz: FuseResult, variants: list[str], main: str) -> None:
    """Curves for `dvc plots` (first seed of each variant) and the three figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tasks.core import io

    first = {v: runs_of(fz, v)[0] for v in variants}
    io.write_json(ctx.results_file("curves/hypervolume.json"),
                  [{"iteration": i, "hypervolume": h, "variant": v}
                   for v in variants for i, h in enumerate(first[v].hypervolume)])
    io.write_json(ctx.results_file("curves/landscape.json"),
                  [{"val_loss": pt.loss, "val_f1": pt.f1, "kind": pt.kind} for pt in first[main].landscape])
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        for r in runs_of(fz, v):
            fused_pts = [pt for pt in r.landscape if pt.kind == "fused"]
            ax.scatter([pt.loss for pt in fused_pts], [pt.f1 for pt in fused_pts], s=10, alpha=0.5)
            ax.scatter([m.loss for m in r.members_val], [m.f1 for m in r.members_val], marker="x", color="k", s=25)
        ax.set(xlabel="validation loss", ylabel="validation macro-F1",
               title=f"{v}: checkpoints (x) and fused points (seeds by colour)")
    ctx.log_figure(fig, "loss_vs_metric.png")
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        r = first[v]
        Y, mask = np.asarray(r.bomf_Y), np.asarray(r.bomf_pareto)
        ax.scatter(Y[:, 0], Y[:, 1], s=12, color="0.6", label="evaluated")
        front = Y[mask][np.argsort(Y[mask][:, 0])]
        ax.plot(front[:, 0], front[:, 1], "o-", color="C3", label="Pareto front")
        ax.set(xlabel="normalised val macro-F1", ylabel="normalised -val loss", title=f"{v}, seed {r.seed}")
        ax.legend()
    ctx.log_figure(fig, "pareto_front.png")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in variants:
        for r in runs_of(fz, v):
            ax.plot(r.hypervolume, label=f"{v} seed {r.seed}")
    ax.set(xlabel="BO iteration (0 = after the Sobol design)", ylabel="hypervolume", title="BOMF hypervolume")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "hypervolume.png")


@stage(params=EvaluateParams, inputs=("hpo", "fuse"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Test macro-F1 per method (mean over seeds), the claims, the landscape / Pareto / hypervolume plots."""
    hpo, fz = load(ctx)
    variants = sorted({r.variant for r in fz.runs.values()}, key=lambda v: v != "full")
    summary = {v: summarise_variant(runs_of(fz, v)) for v in variants}
    transfer = summarise_transfer(hpo)
    main = variants[0]
    s = summary[main]
    gain = [f - m for f, m in zip(s["early_stop_val_f1"], s["majority_val_f1"])]
    claims, learned = fusion_claims(s["per_seed_test_f1"], s["checkpoint_spearman_loss_vs_f1"], gain, p)
    gates = [learned]
    if transfer is not None:
        claim, grid_learns = transfer_claim(transfer["val_f1_at_chosen"], transfer["grid_best_val_f1"],
                                            transfer["majority_val_f1"], p)
        claims.append(claim)
        gates.append(grid_learns)
    write(ctx, claims, gates, summary, transfer, hpo, fz, main)
    write_figures(ctx, fz, variants, main)
