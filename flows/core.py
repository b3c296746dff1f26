"""Prefect side of the platform: one task per DVC stage, GPU tags, the MLflow parent run.

Prefect drives, DVC decides: each task runs ``dvc repro --single-item <paper>-<stage>``, so a stage
whose deps, params and outs are unchanged is skipped by DVC and a rerun after a failure resumes from
the first stage that is not up to date. The stage's own code logs a child MLflow run under the flow's
parent run (its id travels in an environment variable).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.settings import apply_offline_defaults, find_root

apply_offline_defaults()

from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import get_run_context  # noqa: E402

from tasks.core.errors import UnknownStageError  # noqa: E402
from tasks.core.registry import Stage, get_paper, stage_order  # noqa: E402
from tasks.core.tracking import PARENT_RUN_ENV  # noqa: E402

GPU_TAG = "gpu"
LOCK_ERRORS = ("Unable to acquire lock", "is busy", "database is locked")
DONE_LINE = re.compile(r"\[paperflows\] (\S+) done in ([0-9.]+) s")
SKIP_LINE = re.compile(r"Stage '(\S+)' didn't change, skipping")


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch always present here
        return 0


def ensure_gpu_limit(limit: int | None = None) -> int:
    """Create the ``gpu`` tag concurrency limit (= visible GPUs, at least 1) when it is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    limit = limit or max(1, visible_gpus())
    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)
            return limit


def select_stages(paper: str, stages: list[str] | None) -> list[Stage]:
    ordered = stage_order(paper)
    if not stages:
        return ordered
    known = {s.name for s in ordered}
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise UnknownStageError(f"Unknown stage(s) {', '.join(unknown)} of paper '{paper}'. Its stages: "
                                f"{', '.join(s.name for s in ordered)}.")
    return [s for s in ordered if s.name in stages]


def run_dvc(args: list[str], root: Path, env: dict[str, str], log, lock_retries: int = 5,
            backoff: float = 2.0) -> str:
    """Run a dvc command, streaming its output to ``log``; retry DVC lock errors with backoff."""
    for attempt in range(lock_retries + 1):
        proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip() and "\r" not in line:
                log(line.rstrip())
        proc.wait()
        output = "".join(lines)
        if proc.returncode == 0:
            return output
        if any(m in output for m in LOCK_ERRORS) and attempt < lock_retries:
            delay = backoff * 2 ** attempt
            log(f"DVC lock busy; retrying in {delay:.0f} s ({attempt + 1}/{lock_retries})")
            time.sleep(delay)
            continue
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    raise AssertionError("unreachable")


@task(name="dvc-stage", retries=0)
def dvc_stage(dvc_name: str, root: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one DVC stage (DVC decides whether it is up to date). Returns whether it ran and how long
    the stage function itself took."""
    logger = get_run_logger()
    env = dict(os.environ)
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    env.setdefault("PAPERFLOWS_NO_PROGRESS", "1")
    start = time.perf_counter()
    out = run_dvc(["repro", "--single-item", dvc_name], Path(root), env, logger.info)
    wall = time.perf_counter() - start
    done = DONE_LINE.search(out)
    return {"stage": dvc_name, "ran": bool(done), "skipped": bool(SKIP_LINE.search(out)),
            "stage_seconds": float(done.group(2)) if done else 0.0, "wall_seconds": wall}


class ParentRun:
    """The flow's MLflow parent run in the paper's experiment (None when tracking is off)."""

    def __init__(self, root: Path, paper: str, run_name: str, tags: dict[str, str]):
        self.run_id = None
        if os.environ.get("PAPERFLOWS_NO_MLFLOW") in ("1", "true"):
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        from tasks.core.settings import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(root))
        self.client = MlflowClient(tracking_uri(root))
        exp = mlflow.set_experiment(paper)
        run = self.client.create_run(exp.experiment_id, run_name=run_name,
                                     tags={"paper": paper, "kind": "flow", **tags})
        self.run_id = run.info.run_id

    def log(self, metrics: dict[str, float], params: dict[str, str]) -> None:
        if self.run_id:
            for k, v in metrics.items():
                self.client.log_metric(self.run_id, k, float(v))
            for k, v in params.items():
                self.client.log_param(self.run_id, k, str(v)[:6000])

    def end(self, status: str) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status)


def apply_params(root: Path, scale: str, overrides: list[str] | None, papers: list[str]) -> dict:
    """Apply a scale and ``key=value`` overrides to params.yaml (as ``dvc exp run -S`` does)."""
    import yaml

    from tasks.core.errors import ParamsError
    from tasks.core.params import flatten, scale_overrides
    from tasks.core.scales import set_params

    assignments = flatten(scale_overrides(root, scale, papers))
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"Override '{item}' is not of the form key=value (e.g. "
                              f"lowprec_ensemble.train.epochs=10).")
        key, value = item.split("=", 1)
        assignments[key.strip()] = yaml.safe_load(value)
    if assignments:
        set_params(root, assignments)
    return assignments


def run_paper(paper: str, stages: list[str] | None = None, scale: str = "cpu",
              overrides: list[str] | None = None, root: str | None = None) -> dict[str, Any]:
    """Body of every paper flow: stages in order as Prefect tasks, under one MLflow parent run."""
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else find_root()
    get_paper(paper)
    selected = select_stages(paper, stages)
    assignments = apply_params(root_path, scale, overrides, [paper])
    if any(s.gpu for s in selected):
        ensure_gpu_limit()
    ctx = get_run_context()
    flow_run = getattr(ctx, "flow_run", None)
    run_name = getattr(flow_run, "name", None) or f"{paper}-flow"
    parent = ParentRun(root_path, paper, run_name, {
        "prefect_flow_run_id": str(getattr(flow_run, "id", "")), "scale": scale})
    start = time.perf_counter()
    results = []
    status = "FAILED"
    try:
        for st in selected:
            tags = [GPU_TAG] if st.gpu else []
            result = dvc_stage.with_options(name=st.dvc_name, tags=tags)(
                st.dvc_name, str(root_path), parent.run_id)
            results.append(result)
        status = "FINISHED"
    finally:
        flow_seconds = time.perf_counter() - start
        stage_seconds = sum(r["stage_seconds"] for r in results)
        summary = {"flow_seconds": flow_seconds, "stage_seconds_sum": stage_seconds,
                   "orchestration_overhead_seconds": flow_seconds - stage_seconds,
                   "stages_run": sum(r["ran"] for r in results),
                   "stages_skipped": sum(r["skipped"] for r in results)}
        parent.log(summary, {"scale": scale, "stages": ",".join(s.name for s in selected),
                             **{f"override.{k}": v for k, v in assignments.items()}})
        parent.end(status)
    summary.update({"paper": paper, "stages": results, "mlflow_parent_run_id": parent.run_id})
    metrics_path = root_path / "results" / paper / "metrics.json"
    if metrics_path.is_file():
        import json

        claims = json.loads(metrics_path.read_text()).get("claims", {})
        summary["claims"] = claims
        rows = "\n".join(f"| {k} | {'holds' if v else 'does not hold'} |" for k, v in claims.items())
        create_markdown_artifact(key=paper.replace("_", "-") + "-claims",
                                 markdown=f"# {paper}: claims\n\n| claim | result |\n|---|---|\n{rows}\n",
                                 description=f"claims of {paper} after this run")
    logger.info("%s: %d stage(s) ran, %d skipped; flow %.1f s, stage functions %.1f s", paper,
                summary["stages_run"], summary["stages_skipped"], flow_seconds, stage_seconds)
    return summary
