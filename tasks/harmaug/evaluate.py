"""evaluate: teacher and students on the test sets (F1, AUPRC; all categories and the unseen ones), the
generator read by the oracle parser, FLOPs and CPU latency side by side, claims with gates, plots."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .claims import decide, generator_stats
from .common import categories, columns, load_classifier, load_teacher, load_world, read_jsonl, seen_categories
from .plots import write_figures


class EvaluateParams(Params):
    batch_size: int = Field(gt=0, description="scoring batch")
    latency_examples: int = Field(gt=0, description="rows timed (the claim is per 1k rows)")
    latency_batch_size: int = Field(gt=0)
    latency_repeats: int = Field(ge=2, description="interleaved timed rounds (the latency CI's n)")
    latency_threads: int = Field(gt=0, description="torch threads while timing (both models alike)")
    latency_device: Literal["cpu", "stage"] = Field(description="time on the CPU, or on the stage's device")
    parser_rows: int = Field(gt=0, description="world rows per kind the oracle parser is checked on")
    beat_margin: float = Field(description="HarmAug minus a baseline, F1 and AUPRC: CI above this")
    gap_fraction: float = Field(gt=0, lt=1, description="share of the unseen-category F1 gap recovered")
    cost_ratio: float = Field(gt=0, lt=1, description="student / teacher FLOPs and latency: CI below this")
    refusal_margin: float = Field(gt=0, lt=1, description="refusals without the prefix: CI above this")
    wellformed_margin: float = Field(gt=0, lt=1, description="well-formed samples with the prefix: CI above this")
    unseen_margin: float = Field(gt=0, lt=1, description="well-formed unseen-category samples with the prefix")
    kd_gap_min: float = Field(gt=0, description="gate: teacher minus D-only student F1 on unseen categories")
    teacher_f1_max: float = Field(gt=0, le=1, description="gate: the teacher's mean F1 at most this")
    parser_min: float = Field(gt=0, le=1, description="gate: the oracle parser reads the world's rows right")


def metrics_of(labels: np.ndarray, probs: np.ndarray) -> dict:
    """F1 of the argmax (P > 0.5; zero_division=1 as the paper's code) and AUPRC (average precision)."""
    from sklearn.metrics import average_precision_score, f1_score

    return {"f1": float(f1_score(labels, probs > 0.5, zero_division=1)),
            "auprc": float(average_precision_score(labels, probs)) if labels.any() else math.nan}


def score_tests(guard, tests: dict, unseen_mask: dict, batch_size: int) -> tuple[dict, dict]:
    """Metrics per test set and on the pooled unseen-category rows, and the probabilities."""
    probs = {t: guard.prob_unsafe(*columns(rows, "prompt", "response"), batch_size) for t, rows in tests.items()}
    labels = {t: np.array([r["label"] for r in rows]) for t, rows in tests.items()}
    out = {t: metrics_of(labels[t], probs[t]) for t in tests}
    out["unseen"] = metrics_of(np.concatenate([labels[t][unseen_mask[t]] for t in tests]),
                               np.concatenate([probs[t][unseen_mask[t]] for t in tests]))
    return out, probs


def parser_accuracy(world, n: int, seed: int) -> float:
    """Share of the world's rows of every kind, and of its refusals, that the oracle parser reads right."""
    from models.harmaug.world import KINDS, REFUSALS

    if world is None:
        return math.nan
    rng = np.random.default_rng(seed)
    every = list(range(world.n_categories))
    rows = [world.prompt(rng, k, every) for k in KINDS for _ in range(n)]
    right = [world.parse(r.prompt).kind == r.kind and world.parse(r.prompt).category == r.category for r in rows]
    right += [world.parse(t).kind == "refusal" for t in REFUSALS]
    return float(np.mean(right))


def measure_cost(teacher, student, tests: dict, p: EvaluateParams, device) -> dict:
    """FLOPs and seconds of the teacher's and the student's forward passes on the same rows."""
    import torch

    from models.harmaug.guard import forward_flops, time_forward

    rows = [r for t in tests.values() for r in t][:p.latency_examples]
    prompts, responses = columns(rows, "prompt", "response")
    guards = {"teacher": teacher, "student": student}
    for g in guards.values():
        g.model.to("cpu" if p.latency_device == "cpu" else device)
    batches = {n: g.encode(prompts, responses, p.latency_batch_size) for n, g in guards.items()}
    flops = {n: forward_flops(g, batches[n]) for n, g in guards.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(p.latency_threads)
    try:
        times = time_forward(guards, batches, p.latency_repeats)
    finally:
        torch.set_num_threads(threads)
    per_1k = {n: [1000 * t / len(rows) for t in v] for n, v in times.items()}
    return {"flops": flops, "flops_ratio": flops["student"] / flops["teacher"], "seconds_per_1k": per_1k,
            "latency_ratios": [s / t for s, t in zip(per_1k["student"], per_1k["teacher"])], "rows": len(rows),
            "parameters": {n: sum(x.numel() for x in g.model.parameters()) for n, g in guards.items()}}


@stage(params=EvaluateParams, inputs=("prepare", "pretrain", "augment", "finetune"), gpu=True)
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Scores of the teacher and every student, generator statistics, cost, claims, figures."""
    from sklearn.metrics import precision_recall_curve

    from models.harmaug.guard import ClassifierGuard

    prep, ft = ctx.input("prepare"), ctx.input("finetune")
    seen, world = seen_categories(prep), load_world(prep)
    tests = {t: read_jsonl(prep / "tests" / f"{t}.jsonl") for t in io.read_json(prep / "meta.json")["tests"]}
    unseen = {t: np.array([any(c not in seen for c in categories(r["category"])) for r in rows])
              for t, rows in tests.items()}
    teacher = load_teacher(ctx.input("pretrain"), ctx.device)
    scores, probs = {"teacher": {}}, {"teacher": {}}
    scores["teacher"]["all"], probs["teacher"]["all"] = score_tests(teacher, tests, unseen, p.batch_size)
    meta = io.read_json(ft / "meta.json")
    students = {}
    for v in ctx.progress(meta["variants"], desc="students"):
        scores[v], probs[v] = {}, {}
        for s in meta["seeds"]:
            model, tok = load_classifier(ft / f"{v}_seed{s}", ctx.device)
            students[(v, s)] = ClassifierGuard(model, tok, model.config.max_position_embeddings)
            scores[v][s], probs[v][s] = score_tests(students[(v, s)], tests, unseen, p.batch_size)
    aug = ctx.input("augment")
    gen = generator_stats([io.read_json(aug / f"seed{s}" / "instructions.json") for s in meta["seeds"]], seen)
    cost = measure_cost(teacher, students[("harmaug", meta["seeds"][0])], tests, p, ctx.device)
    claims, gates = decide(scores, gen, parser_accuracy(world, p.parser_rows, ctx.seed), cost, p)
    curves = {t: {m: precision_recall_curve([r["label"] for r in rows],
                                            (probs[m]["all"] if m == "teacher" else probs[m][meta["seeds"][0]])[t])[:2]
                  for m in probs} for t, rows in tests.items()}
    ctx.write_metrics(claims, gates, headline=headline(scores, gen, cost),
                      evidence={"scores": scores, "cost": cost, "seen_categories": seen,
                                "generator": summarise_generator(gen), "training_rows": meta["rows"],
                                "unseen_rows": {t: int(m.sum()) for t, m in unseen.items()}})
    ctx.log_metrics({f"effect_{c.name}": c.effect for c in claims if math.isfinite(c.effect)})
    write_figures(ctx, scores, curves, gen, seen)


def mean_over(scores: dict, method: str, metric: str, tests: list[str]) -> float:
    return float(np.mean([scores[method][s][t][metric] for s in scores[method] for t in tests]))


def summarise_generator(gen: dict) -> dict:
    if not gen:
        return {}
    return {k: float(np.mean([v.mean() for v in gen[k]]))
            for k in ("refusal_no_prefix", "refusal_prefix", "wellformed_prefix", "unseen_prefix")} | {
        "histogram": gen["histogram"]}


def headline(scores: dict, gen: dict, cost: dict) -> dict:
    tests = [t for t in scores["teacher"]["all"] if t != "unseen"]
    methods = [m for m in ("teacher", "kd_only", "eda", "no_prefix", "harmaug") if m in scores]
    g = summarise_generator(gen)
    return {"f1_mean": {m: mean_over(scores, m, "f1", tests) for m in methods},
            "auprc_mean": {m: mean_over(scores, m, "auprc", tests) for m in methods},
            "f1_unseen": {m: mean_over(scores, m, "f1", ["unseen"]) for m in methods},
            "generator": {k: v for k, v in g.items() if k != "histogram"}
            | ({"categories_covered": len(g["histogram"].get("harmaug", {}))} if g else {}),
            "cost": {"flops_ratio": cost["flops_ratio"], "latency_ratio": float(np.mean(cost["latency_ratios"])),
                     "teacher_parameters": cost["parameters"]["teacher"],
                     "student_parameters": cost["parameters"]["student"]}}
