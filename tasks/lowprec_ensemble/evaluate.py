"""evaluate: NLL / error / ECE / ambiguity / memory per method over seeds, the claims (by confidence
intervals), results/lowprec_ensemble/ and its figures."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import all_of, gate, per_example, per_seed
from tasks.core.errors import ParamsError

from .common import EnsembleMeta, example_nll

BASELINES = (("deep_ensemble", "deep"), ("snapshot", "sse"), ("snapshot_lpe", "sse_lpe"), ("swag", "swag"),
             ("swag_lpe", "swag_lpe"), ("ivon", "ivon"), ("ivon_lpe", "ivon_lpe"))
BMA = ("swag", "ivon")


class Margins(Params):
    ambiguity_grows: float = Field(description="AMB(b) - AMB(b+1) per seed must exceed this")
    lpe_error_below_rtn: float = Field(description="paired test-error difference LPE - RTN must lie below")
    lpe_nll_below_rtn: float = Field(description="paired test-NLL difference LPE - RTN must lie below")
    lpe_adds_to_snapshots: float = Field(description="paired NLL difference snapshot+LPE - snapshot below")
    gain_grows_with_width: float = Field(description="slope of the LPE NLL gain per doubling of width above")
    lpe_adds_to_bma: float = Field(description="paired NLL difference BMA+LPE - BMA (equal memory) below")
    lpe_comparable_to_bma: float = Field(description="paired NLL difference LPE-BSR - BMA (same size) below")


class EvaluateParams(Params):
    ece_bins: int = Field(gt=0)
    claim_size: int = Field(gt=0, description="ensemble size M at which the claims are checked")
    low_bits: list[int] = Field(min_length=1, description="bits where LPE-BSR is claimed to beat RTN")
    min_fp32_accuracy: float = Field(ge=0, le=1, description="gate: the FP32 model's test accuracy")
    min_widths: int = Field(ge=2, description="gate: widths needed to decide the width claim")
    min_bma_ambiguity: float = Field(ge=0, description="gate: a SWAG / IVON BMA at least this diverse")
    bootstrap: int = Field(ge=100, description="bootstrap resamples of the per-example claims")
    margins: Margins


def _metrics(probs, labels, bins) -> dict:
    from tasks.metrics import ece, error, nll

    return {"nll": nll(probs, labels), "err": error(probs, labels), "ece": ece(probs, labels, bins)}


def summarise(src, meta: EnsembleMeta, p: EvaluateParams):
    """Per-seed arrays, and per method the mean/std over seeds of NLL, ERR, ECE, AMB and memory."""
    from tasks.metrics import ambiguity, mean_std, nll

    qp, fp = meta.quantized_params, meta.fp_params
    mem = lambda members, b: members * ((32 if b is None else b) * qp + 32 * fp) / (32 * (qp + fp))
    arrays = {seed: io.load_arrays(src / f"probs_seed{seed}.npz") for seed in meta.seeds}
    rows: dict[str, list[dict]] = {}
    for a in arrays.values():
        y = a["labels"]
        add = lambda name, row: rows.setdefault(name, []).append(row)
        add("fp32", {**_metrics(a["fp32"], y, p.ece_bins), "memory": mem(1, None)})
        for b in meta.bits:
            add(f"rtn_b{b}", {**_metrics(a[f"rtn_b{b}"], y, p.ece_bins), "memory": mem(1, b)})
            add(f"sr_member_b{b}", {**_metrics(a[f"lpe_b{b}"][0], y, p.ece_bins), "memory": mem(1, b)})
            for m in meta.sizes:
                sub = a[f"lpe_b{b}"][:m]
                add(f"lpe_b{b}_m{m}", {**_metrics(sub.mean(0), y, p.ece_bins), "memory": mem(m, b),
                                       "amb": ambiguity(sub, y),
                                       "member_nll": float(np.mean([nll(q, y) for q in sub]))})
        for name, key in BASELINES:
            if key in a:
                b = {"sse_lpe": meta.snapshot_lpe_bits, "swag_lpe": meta.bma_lpe_bits,
                     "ivon_lpe": meta.bma_lpe_bits}.get(key)
                add(name, {**_metrics(a[key].mean(0), y, p.ece_bins), "memory": mem(len(a[key]), b),
                           "amb": ambiguity(a[key], y), "members": len(a[key])})
        for w in meta.widths:
            add(f"width{w}_fp32", _metrics(a[f"width{w}_fp32"], y, p.ece_bins))
            for key in [f"width{w}_lpe"] + [f"width{w}_lpe_b{b}" for b in meta.width_evidence_bits]:
                add(key, _metrics(a[key][:p.claim_size].mean(0), y, p.ece_bins))
    table = {name: {k: mean_std([r[k] for r in rs]) for k in rs[0]} for name, rs in rows.items()}
    return arrays, rows, table


def decide(arrays: dict, rows: dict, meta: EnsembleMeta, p: EvaluateParams):
    """The claims and their gates (margins from params.yaml, fixed before the run)."""
    M, mg, seeds = p.claim_size, p.margins, list(arrays)
    fp32_acc = 1 - float(np.mean([r["err"] for r in rows["fp32"]]))
    base = gate("fp32_accuracy", fp32_acc, p.min_fp32_accuracy, ">=", "the FP32 model must have learned the task")
    widths = gate("width_sweep", len(meta.widths), p.min_widths, ">=", "widths trained in the sweep")
    ens = lambda a, b: a[f"lpe_b{b}"][:M].mean(0)
    nll_of = lambda a, key: example_nll(a[key].mean(0), a["labels"])
    err = lambda probs, y: (probs.argmax(-1) != y).astype(float)
    low = [b for b in p.low_bits if b in meta.bits]
    order = [b for b in sorted(meta.bits) if b <= 6]
    claims = [
        all_of("ambiguity_grows_as_bits_drop", {f"int{lo}_vs_int{hi}": per_seed(
            f"int{lo}_vs_int{hi}", [rows[f"lpe_b{lo}_m{M}"][i]["amb"] - rows[f"lpe_b{hi}_m{M}"][i]["amb"]
                                    for i in range(len(seeds))],
            margin=mg.ambiguity_grows, gates=[base]) for lo, hi in zip(order[:-1], order[1:])},
            "ensemble ambiguity (member NLL - ensemble NLL) grows as the grid gets coarser"),
        all_of("lpe_error_le_rtn_low_bits", {f"int{b}": per_example(
            f"int{b}", [err(ens(a, b), a["labels"]) - err(a[f"rtn_b{b}"], a["labels"]) for a in arrays.values()],
            margin=mg.lpe_error_below_rtn, direction="<", gates=[base], n_boot=p.bootstrap) for b in low},
            f"LPE-BSR (M={M}) test error below RTN's at equal bits"),
        all_of("lpe_nll_below_rtn", {f"int{b}": per_example(
            f"int{b}", [example_nll(ens(a, b), a["labels"]) - example_nll(a[f"rtn_b{b}"], a["labels"])
                        for a in arrays.values()],
            margin=mg.lpe_nll_below_rtn, direction="<", gates=[base], n_boot=p.bootstrap) for b in low},
            f"LPE-BSR (M={M}) test NLL below RTN's at equal bits"),
    ]
    if all("sse" in a for a in arrays.values()):
        claims.append(per_example(
            "lpe_adds_to_snapshots", [example_nll(a["sse_lpe"].mean(0), a["labels"])
                                      - example_nll(a["sse"].mean(0), a["labels"]) for a in arrays.values()],
            margin=mg.lpe_adds_to_snapshots, direction="<", gates=[base], n_boot=p.bootstrap,
            statement="LPE-BSR members around each snapshot lower the snapshot ensemble's NLL"))
    bma_gates = []
    for name in BMA:
        if name in rows:
            bma_gates.append(gate(f"{name}_diversity", float(np.mean([r["amb"] for r in rows[name]])),
                                  p.min_bma_ambiguity, ">=", f"{name} BMA ambiguity: not a point mass (SWA)"))
            claims.append(per_example(
                f"lpe_adds_to_{name}", [nll_of(a, f"{name}_lpe") - nll_of(a, name) for a in arrays.values()],
                margin=mg.lpe_adds_to_bma, direction="<", gates=[base, bma_gates[-1]], n_boot=p.bootstrap,
                statement=f"LPE-BSR on top of {name} BMA (32/b INT-b members per sample) lowers its NLL at "
                          f"equal memory"))
    b = meta.bma_lpe_bits
    if bma_gates and b in meta.bits:
        names = [n for n in BMA if n in rows]
        claims.append(all_of("lpe_comparable_to_bma", {n: per_example(
            n, [example_nll(ens(a, b), a["labels"]) - nll_of(a, n) for a in arrays.values()],
            margin=mg.lpe_comparable_to_bma, direction="<", gates=[base, g], n_boot=p.bootstrap)
            for n, g in zip(names, bma_gates)}, f"LPE-BSR INT-{b} around the SGD solution (M={M}) is within the margin of "
                                 f"SWAG / IVON BMA's NLL"))
    claims.append(per_seed("lpe_gain_grows_with_width", width_slopes(rows, meta.widths),
                           margin=mg.gain_grows_with_width, gates=[base, widths],
                           statement="the NLL gain of LPE-BSR over FP32 grows with model width (slope per doubling)"))
    return claims, [base, widths, *bma_gates]


def width_slopes(rows: dict, widths: list[int], suffix: str = "") -> list[float]:
    """Per seed: least-squares slope of NLL(FP32) - NLL(LPE-BSR) against log2(width)."""
    if len(widths) < 2:
        return []
    n = len(rows[f"width{widths[0]}_fp32"])
    gains = np.array([[rows[f"width{w}_fp32"][i]["nll"] - rows[f"width{w}_lpe{suffix}"][i]["nll"] for w in widths]
                      for i in range(n)])
    return [float(np.polyfit(np.log2(widths), g, 1)[0]) for g in gains]


def headline(table: dict, meta: EnsembleMeta, M: int, low_bits: list[int]) -> dict:
    """At most 30 numbers: NLL of every method, error at the low bits, the width sweep's gain."""
    val = lambda name, key="nll": table[name][key]["mean"]
    nll = {"fp32": val("fp32")} | {f"lpe_int{b}": val(f"lpe_b{b}_m{M}") for b in meta.bits} \
        | {f"rtn_int{b}": val(f"rtn_b{b}") for b in meta.bits} \
        | {name: val(name) for name, _ in BASELINES if name in table}
    low = [b for b in low_bits if b in meta.bits]
    err = {"fp32": val("fp32", "err")} | {f"lpe_int{b}": val(f"lpe_b{b}_m{M}", "err") for b in low} \
        | {f"rtn_int{b}": val(f"rtn_b{b}", "err") for b in low}
    return {"nll": nll, "err": err, "lpe_gain_by_width": width_gains(table, meta.widths)}


def width_gains(table: dict, widths: list[int], suffix: str = "") -> dict:
    """Mean over seeds of NLL(FP32) - NLL(LPE-BSR) per width."""
    return {str(w): table[f"width{w}_fp32"]["nll"]["mean"] - table[f"width{w}_lpe{suffix}"]["nll"]["mean"]
            for w in widths}


@stage(params=EvaluateParams, inputs=("ensemble",))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """NLL / error / ECE / ambiguity / memory per method over seeds; claims by CI; plots."""
    src = ctx.input("ensemble")
    meta = EnsembleMeta.read(src)
    if p.claim_size > max(meta.sizes):
        raise ParamsError(f"'{ctx.paper}.evaluate.claim_size' = {p.claim_size} exceeds the largest ensemble "
                          f"size drawn ({max(meta.sizes)} in '{ctx.paper}.ensemble.sizes').")
    arrays, rows, table = summarise(src, meta, p)
    claims, gates = decide(arrays, rows, meta, p)
    M = p.claim_size
    amb = {str(b): table[f"lpe_b{b}_m{M}"]["amb"]["mean"] for b in meta.bits}
    ctx.write_metrics(claims, gates, headline=headline(table, meta, M, p.low_bits), evidence={
        "ensemble_size": M, "seeds": meta.seeds, "ambiguity_by_bits": amb,
        "width_slopes": width_slopes(rows, meta.widths),
        "width_evidence_only": {f"int{b}": {"slopes": width_slopes(rows, meta.widths, f"_b{b}"),
                                            "gain_by_width": width_gains(table, meta.widths, f"_b{b}")}
                                for b in meta.width_evidence_bits}, "table": table})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})
    ctx.log_metrics({f"amb_b{b}": v for b, v in amb.items()})
    write_curves_and_figures(ctx, table, meta, M)


def write_curves_and_figures(ctx: StageContext, table: dict, meta: EnsembleMeta, M: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = lambda name, key="nll": table[name][key]["mean"]
    curves_size = [{"bits": f"INT-{b}", "size": m, "nll": val(f"lpe_b{b}_m{m}")}
                   for b in meta.bits for m in meta.sizes]
    curves_mem = [{"method": f"LPE-BSR INT-{b}", "memory": val(f"lpe_b{b}_m{m}", "memory"),
                   "nll": val(f"lpe_b{b}_m{m}")} for b in meta.bits for m in meta.sizes]
    curves_mem += [{"method": name, "memory": val(name, "memory"), "nll": val(name)}
                   for name in ("fp32", *(n for n, _ in BASELINES)) if name in table]
    io.write_json(ctx.results_file("curves/nll_vs_size.json"), curves_size)
    io.write_json(ctx.results_file("curves/nll_vs_memory.json"), curves_mem)
    for row in curves_size:
        ctx.log_metrics({f"nll_{row['bits']}": row["nll"]}, step=row["size"])

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b in meta.bits:
        ax.plot(meta.sizes, [val(f"lpe_b{b}_m{m}") for m in meta.sizes], marker="o", label=f"LPE-BSR INT-{b}")
    ax.axhline(val("fp32"), color="k", ls="--", label="FP32")
    ax.set(xscale="log", xlabel="ensemble size M", ylabel="test NLL",
           title=f"NLL vs ensemble size ({len(meta.seeds)} seeds)")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "nll_vs_size.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b in meta.bits:
        ax.plot([val(f"lpe_b{b}_m{m}", "memory") for m in meta.sizes],
                [val(f"lpe_b{b}_m{m}") for m in meta.sizes], marker="o", label=f"LPE-BSR INT-{b}")
    markers = {"fp32": "k*", "deep_ensemble": "rs", "snapshot": "g^", "snapshot_lpe": "bv", "swag": "mD",
               "swag_lpe": "md", "ivon": "cP", "ivon_lpe": "cX"}
    for name, style in markers.items():
        if name in table:
            ax.plot(val(name, "memory"), val(name), style, ms=9, label=name)
    ax.set(xscale="log", xlabel="memory budget (x one FP32 model)", ylabel="test NLL", title="NLL vs memory budget")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "nll_vs_memory.png")

    if meta.widths:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        gains = [val(f"width{w}_fp32") - val(f"width{w}_lpe") for w in meta.widths]
        errs = [np.hypot(table[f"width{w}_fp32"]["nll"]["std"], table[f"width{w}_lpe"]["nll"]["std"])
                for w in meta.widths]
        ax.errorbar(meta.widths, gains, yerr=errs, marker="o", capsize=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xscale="log", xlabel="hidden width", ylabel="NLL(FP32) - NLL(LPE-BSR)",
               title=f"LPE-BSR gain vs width (INT-{meta.width_bits}, M={M})")
        ctx.log_figure(fig, "lpe_gain_vs_width.png")

    lines = ["| method | NLL | ERR | ECE | AMB | memory (x FP32) |", "|---|---|---|---|---|---|"]
    for name, stats in table.items():
        if ("_m" in name and not name.endswith(f"_m{M}")) or name.startswith("width"):
            continue
        f = lambda k: f"{stats[k]['mean']:.4f} ± {stats[k]['std']:.4f}" if k in stats else "—"
        lines.append(f"| {name} | {f('nll')} | {f('err')} | {f('ece')} | {f('amb')} | "
                     f"{stats['memory']['mean']:.2f} |")
    io.write_text(ctx.results_file("table.md"), "\n".join(lines) + "\n")
