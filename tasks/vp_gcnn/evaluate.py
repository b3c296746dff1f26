"""evaluate: accuracy, NLL and ECE per model and data set, theta per class and layer, kept hue shifts per
class, claims by confidence intervals over seeds (and test examples), gates, plots."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage
from tasks.core.claims import all_of, gate, per_example, per_seed

from .common import DATASETS, load_split, run_name


class EvaluateParams(Params):
    ece_bins: int = Field(gt=1)
    theta_layer: int = Field(ge=1, description="group layer (1-based) of the vp_input_aware claim")
    capped_margin: float = Field(le=0, description="gcnn_capped: accuracy - ceiling above this")
    theta_gap_margin: float = Field(ge=0, description="vp_input_aware: mean theta(7) - theta(6) above this")
    accuracy_tie: float = Field(ge=0, description="'VP >= X': accuracy difference above -accuracy_tie")
    ece_margin: float = Field(ge=0, description="'VP ECE <= Partial ECE': difference below this")
    kept_gap_margin: float = Field(ge=0, description="kept hue fraction, colour-free minus colour-dependent")
    invariance_tolerance: float = Field(gt=0, description="gate: G-CNN logits change at most this under C_4")
    backbone_min_accuracy: float = Field(gt=0, le=1, description="gate: the CNN's Digits67-180 accuracy")
    colour_min_accuracy: float = Field(gt=0, le=1, description="gate: the CNN's ColorDigits-LT accuracy")
    n_boot: int = Field(gt=99)


def load_runs(train_dir, data_dir, seeds: list[int], models: dict[str, list[str]], bins: int) -> dict:
    """{dataset: {model: {seed: {probs, subset, correct, accuracy, nll, ece, losses}}}}."""
    from tasks.metrics import ece, nll

    out: dict = {}
    for ds, names in models.items():
        labels = load_split(data_dir, ds, "test")["y"]
        for m in names:
            for s in seeds:
                r = io.load_arrays(train_dir / "runs" / f"{run_name(ds, m, s)}.npz")
                r["correct"] = (r["probs"].argmax(1) == labels).astype(float)
                r.update(accuracy=float(r["correct"].mean()), nll=nll(r["probs"], labels),
                         ece=ece(r["probs"], labels, bins))
                out.setdefault(ds, {}).setdefault(m, {})[s] = r
    return out


def theta_by_class(runs: dict, labels: np.ndarray, classes: dict[str, list[int]]) -> dict:
    """Mean theta per class group and layer, per seed: {seed: {group: [layer means]}}."""
    return {s: {g: r["subset"][np.isin(labels, c)].mean(0).tolist() for g, c in classes.items()}
            for s, r in runs.items()}


def gap_contributions(theta: np.ndarray, is_seven: np.ndarray) -> np.ndarray:
    """Per-example terms whose mean is mean theta(7) - mean theta(6) (for a bootstrap within one seed)."""
    n = len(theta)
    return n * theta * np.where(is_seven, 1 / is_seven.sum(), -1 / (~is_seven).sum())


def decide(runs: dict, info: dict, p: EvaluateParams):
    """Claims and gates from the loaded runs; ``info``: ceiling, invariance errors, labels, colour cells."""
    seeds = sorted(runs["digits67"]["cnn"])
    acc = lambda ds, m: [runs[ds][m][s]["accuracy"] for s in seeds]
    diffs = lambda ds, a, b, mask=None: [(runs[ds][a][s]["correct"] - runs[ds][b][s]["correct"])[mask if mask
                                         is not None else slice(None)] for s in seeds]
    gates = [gate("gcnn_invariant", max(info["invariance_errors"]), p.invariance_tolerance, "<=",
                  "largest |logit change| of the G-CNN under exact 90/180/270-degree rotations"),
             gate("backbone_learns", np.mean(acc("digits67", "cnn")), p.backbone_min_accuracy, ">=",
                  "the plain CNN's Digits67-180 test accuracy (the shared backbone can learn the task)"),
             gate("colour_backbone_learns", np.mean(acc("colour", "cnn")), p.colour_min_accuracy, ">=",
                  "the plain CNN's ColorDigits-LT test accuracy")]
    rot_gates, colour_gates = gates[1:2], gates[2:]
    layer = p.theta_layer - 1
    labels = info["labels"]["digits67"]
    seven = labels == 2
    theta = {s: runs["digits67"]["vp"][s]["subset"][:, layer] for s in seeds}
    gaps = [float(theta[s][seven].mean() - theta[s][~seven].mean()) for s in seeds]
    tie = -p.accuracy_tie
    beats = {}
    for ds, base in (("rotated", "gcnn"), ("colour", "ce")):
        beats[f"{ds}_vs_partial"] = per_example(f"{ds}_vs_partial", diffs(ds, "vp", "partial"), margin=tie,
                                                gates=rot_gates if ds == "rotated" else colour_gates, n_boot=p.n_boot)
        beats[f"{ds}_vs_{base}"] = per_example(f"{ds}_vs_{base}", diffs(ds, "vp", base), margin=0.0,
                                               gates=rot_gates if ds == "rotated" else colour_gates, n_boot=p.n_boot)
        beats[f"{ds}_vs_cnn"] = per_example(f"{ds}_vs_cnn", diffs(ds, "vp", "cnn"), margin=tie,
                                            gates=rot_gates if ds == "rotated" else colour_gates, n_boot=p.n_boot)
    ece = lambda ds, m: np.asarray([runs[ds][m][s]["ece"] for s in seeds])
    kept = {s: runs["colour"]["vp"][s]["subset"].mean(1) for s in seeds}
    dep = info["colour_dependent"]
    tail = info["tail"]
    claims = [
        per_seed("gcnn_capped", [a - info["ceiling"] for a in acc("digits67", "gcnn")], margin=p.capped_margin,
                 gates=gates[:2], statement=f"G-CNN Digits67-180 accuracy minus the invariant ceiling "
                                            f"{info['ceiling']:.3f} (it cannot exceed it) is above {p.capped_margin}"),
        all_of("vp_input_aware", {
            "across_seeds": per_seed("across_seeds", gaps, margin=p.theta_gap_margin, gates=rot_gates,
                                     statement=f"mean theta(7) - theta(6) at group layer {p.theta_layer}"),
            **{f"seed{s}": per_example(f"seed{s}", [gap_contributions(theta[s], seven)], margin=0.0,
                                       gates=rot_gates, n_boot=p.n_boot,
                                       statement=f"seed {s}: theta(7) > theta(6), bootstrap over test images")
               for s in seeds}},
            statement="VP's theta(x) is larger for 7s than for 6s (both 6 classes) at the chosen group layer, "
                      "across seeds and on every seed"),
        all_of("vp_beats_partial_and_gcnn", beats, statement="VP accuracy >= Partial, > G-CNN / CE-CNN, >= CNN on "
               "Digits67-180-rot and ColorDigits-LT (paired per test image, bootstrap over seeds and images)"),
        all_of("vp_better_calibrated", {
            ds: per_seed(ds, (ece(ds, "vp") - ece(ds, "partial")).tolist(), margin=p.ece_margin, direction="<",
                         statement=f"ECE(VP) - ECE(Partial) on {ds}") for ds in DATASETS},
            statement="VP's ECE is not above Partial's (within ece_margin) on every data set"),
        all_of("vp_colour_tail", {
            "tail_accuracy": per_example("tail_accuracy", diffs("colour", "vp", "ce", tail), margin=tie,
                                         gates=colour_gates, n_boot=p.n_boot,
                                         statement="VP-CE minus CE-CNN correctness on tail-cell test images"),
            "kept_fraction": per_seed("kept_fraction", [float(kept[s][~dep].mean() - kept[s][dep].mean())
                                                        for s in seeds], margin=p.kept_gap_margin,
                                      gates=colour_gates,
                                      statement="kept hue fraction: colour-free minus colour-dependent classes")},
            statement="on ColorDigits-LT, VP-CE tail accuracy >= CE-CNN's, and fewer hue shifts kept for "
                      "classes whose label depends on the colour"),
    ]
    return claims, gates, {"theta_gap_per_seed": gaps}


@stage(params=EvaluateParams, inputs=("prepare", "train"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Claims by confidence intervals, gates, theta per class and layer, kept hue shifts, plots."""
    from .plots import write_figures

    data_dir, train_dir = ctx.input("prepare"), ctx.input("train")
    meta, summary = io.read_json(data_dir / "meta.json"), io.read_json(train_dir / "runs.json")
    models = {ds: sorted({r["model"] for r in summary["runs"] if r["dataset"] == ds}) for ds in DATASETS}
    runs = load_runs(train_dir, data_dir, summary["seeds"], models, p.ece_bins)
    info = test_info(data_dir, meta, summary)
    claims, gates, extra = decide(runs, info, p)
    tables = summarise(runs, info)
    ctx.write_metrics(claims, gates, headline=headline(tables, info, summary, extra),
                      evidence={**tables, **extra, "lambda_sweep": io.read_json(train_dir / "sweep.json"),
                                "invariance_errors": info["invariance_errors"], "ceiling": info["ceiling"],
                                "colour_layout": meta["colour_layout"], "sizes": meta["sizes"]})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims})
    write_figures(ctx, runs, info, tables)


def test_info(data_dir, meta: dict, summary: dict) -> dict:
    colour = load_split(data_dir, "colour", "test")
    layout = meta["colour_layout"]
    return {"ceiling": meta["invariant_ceiling"],
            "labels": {ds: load_split(data_dir, ds, "test")["y"] for ds in DATASETS},
            "invariance_errors": [r["invariance_error"] for r in summary["runs"] if r["invariance_error"] is not None],
            "colour_dependent": np.isin(colour["digit"], layout["colour_digits"]),
            "tail": np.isin(colour["cell"], layout["tail_cells"]), "cell": colour["cell"]}


def summarise(runs: dict, info: dict) -> dict:
    """Per data set and model: accuracy / NLL / ECE (mean, std, per seed); theta or kept hue per class and layer."""
    from tasks.metrics import mean_std

    scores = {ds: {m: {k: {**mean_std([r[k] for r in per.values()]), "per_seed": [r[k] for r in per.values()]}
                       for k in ("accuracy", "nll", "ece")} for m, per in by_model.items()}
              for ds, by_model in runs.items()}
    classes = {"6": [0], "6_rotated": [1], "7": [2]}
    theta = {ds: {m: theta_by_class(runs[ds][m], info["labels"][ds], classes) for m in ("partial", "vp")
                  if m in runs[ds]} for ds in ("digits67", "rotated")}
    dep, tail = info["colour_dependent"], info["tail"]
    kept = {m: {s: {"colour_dependent": r["subset"][dep].mean(0).tolist(),
                    "colour_free": r["subset"][~dep].mean(0).tolist()} for s, r in runs["colour"][m].items()}
            for m in ("partial", "vp", "vp_bernoulli") if m in runs["colour"]}
    tail_acc = {m: mean_std([r["correct"][tail].mean() for r in per.values()]) for m, per in runs["colour"].items()}
    roughness = {m: mean_std([float(np.abs(np.diff(r["losses"])).mean()) for r in per.values()])
                 for m, per in runs["colour"].items()}
    return {"scores": scores, "theta_per_class": theta, "kept_hue": kept, "tail_accuracy": tail_acc,
            "loss_roughness": roughness}


def headline(tables: dict, info: dict, summary: dict, extra: dict) -> dict:
    s = tables["scores"]
    vp_theta = tables["theta_per_class"]["digits67"]["vp"]
    layer_means = lambda g: np.mean([v[g] for v in vp_theta.values()], axis=0).round(4).tolist()
    return {"accuracy": {ds: {m: round(v["accuracy"]["mean"], 4) for m, v in by.items()} for ds, by in s.items()},
            "ece_vp_minus_partial": {ds: round(by["vp"]["ece"]["mean"] - by["partial"]["ece"]["mean"], 4)
                                     for ds, by in s.items()},
            "invariant_ceiling": round(info["ceiling"], 4),
            "vp_theta_digits67": {"6": layer_means("6"), "7": layer_means("7")},
            "tail_accuracy": {m: round(tables["tail_accuracy"][m]["mean"], 4) for m in ("vp", "ce")},
            "lambda": summary["lambdas"]}
