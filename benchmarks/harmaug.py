"""Benchmark: the student guard's inference cost against the teacher's, side by side in one process.

    python benchmarks/harmaug.py [--repeats 7] [--examples 1000] [--batch-size 100] [--threads 1]

Uses the trained teacher and the first HarmAug student of `dvc repro harmaug-evaluate` when artifacts/
holds them, else randomly initialised models of the params.yaml sizes (cost does not depend on the
weights), on rows of the symbolic harm world's test sets. Prints forward FLOPs (torch's FLOP counter) and
CPU seconds per 1,000 rows of both models (interleaved rounds, order rotated, one warm-up pass; the
code the evaluate stage's `student_cheaper` claim uses, `models.harmaug.guard.time_forward`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def guards(params: dict, art: Path, random_init: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.harmaug.guard import ClassifierGuard, classifier_from_config
    from models.harmaug.lm import word_tokenizer
    from models.harmaug.world import HarmWorld

    teacher_dir, student_dir = art / "pretrain" / "teacher", art / "finetune" / "harmaug_seed0"
    if not random_init and teacher_dir.is_dir() and student_dir.is_dir():
        out = {}
        for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
            model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
            out[name] = ClassifierGuard(model, AutoTokenizer.from_pretrained(str(folder)), 64)
        return out, "trained"
    tok = word_tokenizer(HarmWorld(**params["prepare"]["world"]).vocabulary())
    t, s = params["pretrain"]["teacher"], params["finetune"]["student"]
    out = {}
    for name, c in (("teacher", t), ("student", s)):
        model = classifier_from_config(c["arch"], len(tok), c["hidden"], c["layers"], c["heads"], c["intermediate"],
                                       c["max_length"], tok.pad_token_id).eval()
        out[name] = ClassifierGuard(model, tok, c["max_length"])
    return out, "random init"


def main(argv=None) -> int:
    import numpy as np
    import torch
    import yaml

    from models.harmaug.guard import forward_flops, time_forward
    from models.harmaug.world import HarmWorld

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-init", action="store_true", help="ignore trained artifacts")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["harmaug"]
    art = ROOT / "artifacts" / "harmaug"
    models, origin = guards(params, art, args.random_init)
    world = HarmWorld(**params["prepare"]["world"])
    rows = world.dataset(np.random.default_rng(0), args.examples, list(range(world.n_categories)), 0.5, True, 0.0)
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    batches = {n: g.encode(prompts, responses, args.batch_size) for n, g in models.items()}
    flops = {n: forward_flops(g, batches[n]) for n, g in models.items()}
    times = time_forward(models, batches, args.repeats)
    per_1k = {n: [1000 * t / len(rows) for t in v] for n, v in times.items()}
    ratios = [s / t for s, t in zip(per_1k["student"], per_1k["teacher"])]
    report = {"models": origin, "threads": args.threads, "rows": len(rows), "batch_size": args.batch_size,
              "parameters": {n: sum(p.numel() for p in g.model.parameters()) for n, g in models.items()},
              "forward_flops": flops, "flops_ratio": flops["student"] / flops["teacher"],
              "seconds_per_1k_median": {n: float(np.median(v)) for n, v in per_1k.items()},
              "latency_ratio_median": float(np.median(ratios)), "load": os.getloadavg()[0]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
