"""Are a paper's verdicts a property of the method or of one seed? ``python -m tasks seeds <paper>``.

Every stage derives its randomness (data splits, initialisations, sampling) from the global ``seed`` of
params.yaml. This command re-runs a paper's whole pipeline once per extra global seed, each in a temporary
copy of the workspace (the workspace, its ``params.yaml``, ``dvc.lock`` and ``results/`` are never
touched; artifacts go to the shared DVC cache, MLflow runs to the workspace's store, tagged with the
seed), and compares every claim's verdict with the committed run's. The comparison is written to
``results/seed_checks/<paper>.json`` (small, committed with git) and printed as a table.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SEEDS = (1000, 2000)


def _project_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (root / f).is_file()]


def _copy_workspace(root: Path, dest: Path) -> None:
    """The project's code and params (no results, no dvc.lock) as a fresh git+DVC repo sharing the cache."""
    for rel in _project_files(root):
        if rel.startswith("results/") or rel == "dvc.lock":
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "seedcheck", "GIT_AUTHOR_EMAIL": "seedcheck@localhost",
           "GIT_COMMITTER_NAME": "seedcheck", "GIT_COMMITTER_EMAIL": "seedcheck@localhost"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "seed check"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    if cache:
        subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", cache], cwd=dest, check=True,
                       capture_output=True)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    detail = metrics.get("claims_detail", {})
    return {"claims": metrics.get("claims", {}),
            "effects": {k: {f: d.get(f) for f in ("effect", "ci", "direction", "margin", "n", "reason")
                            if f in d} for k, d in detail.items() if isinstance(d, dict)},
            "gates": metrics.get("gates", {})}


def run_seed(root: Path, paper: str, seed: int, log=print) -> dict[str, Any]:
    """Run ``<paper>-evaluate`` and its upstream stages with global ``seed`` in a temporary workspace."""
    from .core.scales import set_params
    from .core.settings import tracking_uri

    with tempfile.TemporaryDirectory(prefix=f"paperflows-seed{seed}-") as tmp:
        work = Path(tmp) / "repo"
        _copy_workspace(root, work)
        set_params(work, {"seed": seed})
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "PAPERFLOWS_SEED_CHECK": str(seed)}
        log(f"{paper}: seed {seed} in a temporary workspace ...")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", f"{paper}-evaluate"], cwd=work, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{paper} with seed {seed} failed (dvc repro exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads((work / "results" / paper / "metrics.json").read_text())
    log(f"{paper}: seed {seed} done in {seconds:.0f} s")
    return {"seed": seed, "seconds": round(seconds, 1), **_summary(metrics)}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per claim, its verdict under every seed; ``same`` when no verdict moved (None counts as a verdict)."""
    names = list(dict.fromkeys(k for r in runs for k in r["claims"]))
    verdicts = {k: [r["claims"].get(k) for r in runs] for k in names}
    changed = [k for k, v in verdicts.items() if len(set(map(str, v))) > 1]
    return {"seeds": [r["seed"] for r in runs], "verdicts": verdicts, "changed": changed,
            "same": not changed}


def seed_check(root: Path, paper: str, seeds: list[int], log=print) -> dict[str, Any]:
    import yaml

    from .core.errors import MissingInputError, ParamsError
    from .core.registry import get_paper

    get_paper(paper)  # a clear error for an unknown paper
    committed = root / "results" / paper / "metrics.json"
    if not committed.exists():
        raise MissingInputError(f"{committed} is missing: run `dvc repro {paper}-evaluate` first")
    base_seed = yaml.safe_load((root / "params.yaml").read_text())["seed"]
    if base_seed in seeds:
        raise ParamsError(f"seed {base_seed} is the committed run's seed (params.yaml `seed`); choose others")
    runs = [{"seed": base_seed, "seconds": None, **_summary(json.loads(committed.read_text()))}]
    runs += [run_seed(root, paper, s, log) for s in seeds]
    result = {"paper": paper, **compare(runs), "runs": runs}
    out = root / "results" / "seed_checks" / f"{paper}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = ["| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | same |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for name, v in result["verdicts"].items():
        lines.append(f"| {name} | " + " | ".join("null" if x is None else str(x).lower() for x in v)
                     + f" | {'yes' if name not in result['changed'] else '**no**'} |")
    return "\n".join(lines) + "\n"
