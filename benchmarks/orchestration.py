"""Benchmark: what orchestration costs on top of the stages' own work, each target beside its measure.

    python benchmarks/orchestration.py [--papers lowprec_ensemble ...] [--flow-paper lowprec_ensemble]
                                       [--skip-flow]

In fresh copies of the project (temporary folders; the workspace is not touched) it measures, in one run:
- with a fresh process per stage (before) and through the warm stage server (after):
- per-stage overhead: wall time of `dvc repro --single-item -f <stage>` minus the stage function's own
  time (the `[paperflows] ... done in` line), median over every stage of the given papers at smoke scale
  (target <= 1.0 s), and beside it DVC's own share (`dvc repro --single-item` of an up-to-date stage);
- every given paper's smoke `dvc repro <paper>-evaluate` from nothing (target <= 30 s);
- a local Prefect flow of ``--flow-paper`` against `dvc repro` of the same paper, both from nothing, at
  CPU scale (target <= 1.05x); the process pools need `make serve` and are not measured here.
Run it near idle: the numbers are wall-clock times (the load average is printed beside them).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DONE = re.compile(r"\[paperflows\] (\S+) done in ([0-9.]+) s")


def clone(dest: Path, scale: str) -> Path:
    from tests.conftest import make_clone

    return make_clone(dest, scale=scale)


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PAPERFLOWS_NO_PROGRESS": "1", "PAPERFLOWS_NO_MLFLOW": os.environ.get(
        "PAPERFLOWS_NO_MLFLOW", "0"), "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                                               os.environ.get("PATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    from tasks.core.registry import papers, stage_order

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", nargs="*", default=None, help="papers to measure (default: all)")
    parser.add_argument("--flow-paper", default="lowprec_ensemble", help="paper of the flow-vs-repro ratio")
    parser.add_argument("--skip-flow", action="store_true", help="skip the CPU-scale flow-vs-repro ratio")
    args = parser.parse_args(argv)
    chosen = args.papers or papers()
    dvc = [sys.executable, "-m", "dvc"]
    rows = []
    print(f"start: {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("0", "1"):  # before (a fresh process per stage) and after (the warm stage server)
            os.environ["PAPERFLOWS_STAGE_SERVER"] = mode
            label = "stage server" if mode == "1" else "fresh processes"
            if mode == "1":
                from tasks.stageserver import warm

                warm()
            repo = clone(Path(tmp) / f"smoke-{mode}", "smoke")
            overheads, floors = [], []
            for paper in chosen:
                wall, out = run([*dvc, "repro", f"{paper}-evaluate"], repo)
                rows.append((f"[{label}] smoke `dvc repro {paper}-evaluate`", f"{wall:.1f} s", "<= 30 s"))
                for st in stage_order(paper):
                    wall, out = run([*dvc, "repro", "--single-item", "-f", st.dvc_name], repo)
                    own = DONE.search(out)
                    overheads.append(wall - float(own.group(2)) if own else float("nan"))
                    floor, _ = run([*dvc, "repro", "--single-item", st.dvc_name], repo)  # up to date
                    floors.append(floor)
                print(f"{paper} ({label}): measured ({load()})", flush=True)
            rows.insert(0, (f"[{label}] per-stage overhead, median over {len(overheads)} stages",
                            f"{statistics.median(overheads):.2f} s", "<= 1.0 s"))
            rows.insert(1, (f"[{label}]   of which DVC itself (up-to-date stage), median",
                            f"{statistics.median(floors):.2f} s", "-"))
        if not args.skip_flow:
            cpu_a = clone(Path(tmp) / "cpu-repro", "cpu")
            repro, _ = run([*dvc, "repro", f"{args.flow_paper}-evaluate"], cpu_a)
            cpu_b = clone(Path(tmp) / "cpu-flow", "cpu")
            flow, _ = run([sys.executable, "-m", "flows", args.flow_paper], cpu_b)
            rows.append((f"[stage server] local flow / dvc repro, {args.flow_paper} at CPU scale",
                         f"{flow / repro:.2f}x ({flow:.0f} s / {repro:.0f} s)", "<= 1.05x"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  {'measured':>22}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>22}  {target}")
    print(f"\nend: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
