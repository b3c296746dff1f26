"""Prefect side of the platform: one task per DVC stage, GPU tags, the MLflow parent run.

Prefect drives, DVC decides: each task runs ``dvc repro --single-item <paper>-<stage>``, so a stage
whose deps, params and outs are unchanged is skipped by DVC and a rerun after a failure resumes from
the first stage that is not up to date. The stage's own code logs a child MLflow run under the flow's
parent run (its id travels in an environment variable).
"""
from __future__ import annotations

import json
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
# DVC's own lock errors (a concurrent dvc in the same workspace): only these are retried, and only
# when DVC itself reports them on an ERROR line before any stage ran (never a stage's own output,
# e.g. MLflow's "database is locked", which would re-run a finished computation)
LOCK_ERRORS = ("Unable to acquire lock", "is busy")
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


def dvc_lock_error(output: str) -> bool:
    """Did DVC fail on its own workspace lock (and not after a stage command started)?"""
    if DONE_LINE.search(output) or "Running stage" in output:
        return False
    return any(line.startswith("ERROR") and any(m in line for m in LOCK_ERRORS) for line in output.splitlines())


def run_dvc(args: list[str], root: Path, env: dict[str, str], log, lock_retries: int = 5,
            backoff: float = 2.0) -> str:
    """Run a dvc command, streaming its output to ``log``; retry DVC lock errors with backoff."""
    # dvc.yaml commands call `python`: make it this interpreter (the project's venv)
    env = {**env, "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])}
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
        if dvc_lock_error(output) and attempt < lock_retries:
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



# ------------------------------------------------------------------ several workspaces, one remote
def read_lock(root: Path) -> dict[str, Any]:
    import yaml

    path = root / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.is_file() else {}


def merge_lock(root: Path, entries: dict[str, Any]) -> None:
    """Write stages' dvc.lock entries produced in another workspace into this one's dvc.lock."""
    if not entries:
        return
    import yaml

    from tasks.core import io

    path = root / "dvc.lock"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    data = data or {"schema": "2.0", "stages": {}}
    data.setdefault("stages", {}).update(entries)
    io.write_text(path, yaml.safe_dump(data, sort_keys=False))


def has_remote(root: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=root, capture_output=True,
                         text=True)
    return bool(out.stdout.strip())


def publish_results(root: Path, paper: str) -> bool:
    """results/<paper> from the evaluate artifact's cached copy (after a pull from the remote)."""
    import shutil

    from tasks.core import io

    src = root / "artifacts" / paper / "evaluate" / "results"
    if not src.is_dir():
        return False
    final = root / "results" / paper
    tmp = io.new_tmp_dir(final)
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    io.commit_dir(tmp, final)
    return True


def save_experiment(root: Path, name: str, stages: list[str], log) -> str | None:
    """Record the workspace (params, dvc.lock, results) as a DVC experiment, like `dvc exp run`;
    only ``stages``' outputs are cached (other papers' outputs need not exist here)."""
    if not (root / ".git").exists():
        return None
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", name)
    try:
        paper = stages[0].split("-", 1)[0] if stages else None
        results = root / "results" / paper if paper else None
        include = ["-I", f"results/{paper}"] if results is not None and results.is_dir() else []
        run_dvc(["exp", "save", "--force", "-n", safe, *include, *stages], root, dict(os.environ), log)
    except RuntimeError as exc:
        log(f"could not save the DVC experiment: {exc}")
        return None
    return safe


def stage_in_pool(st: Stage, root: Path, assignments: dict, lock_entries: dict,
                  parent_run_id: str | None, timeout: float | None) -> dict[str, Any]:
    """Run one stage as a run of the `dvc-stage/<pool>` deployment and wait for it."""
    from prefect.deployments import run_deployment

    pool = GPU_TAG if st.gpu else "cpu"
    run = run_deployment(name=f"dvc-stage/{pool}", timeout=timeout, parameters={
        "paper": st.paper, "stage": st.name, "assignments": assignments,
        "lock_entries": lock_entries, "parent_run_id": parent_run_id})
    if not run.state or not run.state.is_completed():
        reason = (run.state.message or "").strip() if run.state else ""
        raise RuntimeError(f"{st.dvc_name} on pool '{pool}' ended {run.state.name if run.state else 'unknown'}"
                           f" (flow run {run.name}): {reason or 'no reason reported'}")
    return read_report(run.id, "dvc-stage-report")


def read_report(flow_run_id, key: str) -> dict[str, Any]:
    """The JSON report a flow run left as a markdown artifact (readable from any host)."""

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    found = [a for a in arts if a.key == key]
    if not found:
        raise RuntimeError(f"flow run {flow_run_id} left no '{key}' report")
    block = re.search(r"```json\n(.*?)\n```", found[0].data, re.S)  # a markdown report's data block
    return json.loads(block.group(1) if block else found[0].data)


class ParentRun:
    """The flow's MLflow parent run in the paper's experiment (None when tracking is off)."""

    def __init__(self, root: Path, paper: str, run_name: str, tags: dict[str, str]):
        self.run_id = self.link = None
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
        uri = tracking_uri(root)
        self.link = (f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{self.run_id}"
                     if uri.startswith("http") else f"`mlflow ui --backend-store-uri {uri}`")

    def log(self, metrics: dict[str, float], params: dict[str, str]) -> None:
        if self.run_id:
            for k, v in metrics.items():
                self.client.log_metric(self.run_id, k, float(v))
            for k, v in params.items():
                self.client.log_param(self.run_id, k, str(v)[:6000])

    def end(self, status: str) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status)


def run_assignments(root: Path, scale: str, overrides: list[str] | None, papers: list[str]) -> dict:
    """The dotted params a run sets: its scale's overrides, then ``key=value`` overrides."""
    import yaml

    from tasks.core.errors import ParamsError
    from tasks.core.params import flatten, scale_overrides

    assignments = flatten(scale_overrides(root, scale, papers))
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"Override '{item}' is not of the form key=value (e.g. "
                              f"lowprec_ensemble.train.epochs=10).")
        key, value = item.split("=", 1)
        assignments[key.strip()] = yaml.safe_load(value)
    return assignments


def validate_run(root: Path, selected: list[Stage], assignments: dict) -> None:
    """Validate every selected stage's params as the run will see them, before anything runs or is
    written: a bad value fails the flow run with the key, the value and the allowed range."""
    from tasks.core.context import load_stage_params
    from tasks.core.errors import ParamsError
    from tasks.core.params import deep_merge, load_yaml

    data = load_yaml(root / "params.yaml")
    for dotted, value in assignments.items():
        node, keys = {}, dotted.split(".")
        nested = node
        for key in keys[:-1]:
            nested = nested.setdefault(key, {})
        nested[keys[-1]] = value
        probe = data
        for key in keys[:-1]:
            if not isinstance(probe, dict) or key not in probe:
                raise ParamsError(f"Cannot set '{dotted}': '{key}' is not a section of params.yaml.")
            probe = probe[key]
        data = deep_merge(data, node)
    for st in selected:
        load_stage_params(root, st, data)


class WorkspaceGuard:
    """Leaves the workspace as a run found it: params.yaml, dvc.lock and results/<paper> are restored
    byte for byte, and the paper's artifacts are checked out again from the DVC cache at the restored
    dvc.lock (a run with a scale or overrides is kept as a DVC experiment and an MLflow run instead)."""

    FILES = ("params.yaml", "dvc.lock")

    def __init__(self, root: Path, paper: str):
        import shutil
        import tempfile

        self.root, self.paper = root, paper
        self.files = {f: (root / f).read_bytes() if (root / f).is_file() else None for f in self.FILES}
        self.results = root / "results" / paper
        self.backup = None
        if self.results.is_dir():
            self.backup = Path(tempfile.mkdtemp(prefix="paperflows-guard-")) / paper
            shutil.copytree(self.results, self.backup)

    def restore(self, log=print) -> None:
        import shutil

        from tasks.core import io

        for name, data in self.files.items():
            path = self.root / name
            if data is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != data:
                with io.atomic_file(path, "wb") as fh:
                    fh.write(data)
        if self.backup is not None:
            tmp = io.new_tmp_dir(self.results)
            shutil.rmtree(tmp)
            shutil.copytree(self.backup, tmp)
            io.commit_dir(tmp, self.results)
            shutil.rmtree(self.backup.parent, ignore_errors=True)
        elif self.results.exists():
            shutil.rmtree(self.results)
        stages = [name for name in read_lock(self.root) if name.startswith(f"{self.paper}-")]
        if stages:
            proc = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--allow-missing", "-f", *stages],
                                  cwd=self.root, capture_output=True, text=True)
            if proc.returncode != 0:
                log(f"dvc checkout after the run: {proc.stderr.strip()[-500:]}")


def claims_artifact(root: Path, paper: str, scale: str, summary: dict) -> None:
    """The paper's claims after the run, as a Prefect table artifact (and into ``summary``)."""
    metrics_path = root / "results" / paper / "metrics.json"
    if not metrics_path.is_file():
        return
    from tasks.report import VERDICT, describe

    metrics = json.loads(metrics_path.read_text())
    summary["claims"] = metrics.get("claims", {})
    details = metrics.get("claims_detail", {})
    rows = "\n".join(f"| {k} | {VERDICT[v]} | {describe(details[k]) if k in details else ''} | "
                     f"{details.get(k, {}).get('reason') or ''} |" for k, v in summary["claims"].items())
    create_markdown_artifact(
        key=paper.replace("_", "-") + "-claims",
        markdown=f"# {paper}: claims (scale: {scale})\n\n| claim | verdict | effect [95% CI] vs margin | "
                 f"reason |\n|---|---|---|---|\n{rows}\n",
        description=f"claims of {paper} after this run")


def run_report(summary: dict) -> str:
    """The flow-run report: a table of stages (ran or skipped, seconds) and the run's links."""
    lines = [f"# {summary['paper']} ({summary['scale']} scale, executor {summary['executor']})", "",
             "| stage | ran | skipped | stage s | wall s |", "|---|---|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['stage']} | {'yes' if r['ran'] else 'no'} | {'yes' if r['skipped'] else 'no'} | "
                     f"{r['stage_seconds']:.1f} | {r.get('wall_seconds', 0.0):.1f} |")
    lines += ["", f"flow {summary['flow_seconds']:.1f} s, stage functions {summary['stage_seconds_sum']:.1f} s; "
              f"MLflow parent run `{summary['mlflow_parent_run_id']}`"]
    if summary.get("dvc_experiment"):
        lines.append(f"; DVC experiment `{summary['dvc_experiment']}` (`dvc exp apply` brings it into the "
                     f"workspace)")
    lines += ["", "```json", json.dumps(summary, default=str), "```"]
    return "\n".join(lines) + "\n"


def run_paper(paper: str, stages: list[str] | None = None, scale: str = "cpu",
              overrides: list[str] | None = None, executor: str = "local", root: str | None = None,
              stage_timeout: float | None = None) -> dict[str, Any]:
    """Body of every paper flow: stages in order, under one MLflow parent run.

    executor 'local': each stage is a task of this flow run (GPU stages under the `gpu` tag limit).
    executor 'pools': each stage is a run of the `dvc-stage/cpu` or `dvc-stage/gpu` deployment, picked
    up by a worker of that pool in its own workspace; artifacts travel through the DVC remote and the
    stages' dvc.lock entries travel with the runs. With overrides, the result is saved as a DVC
    experiment (`dvc exp show`)."""
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else find_root()
    get_paper(paper)
    selected = select_stages(paper, stages)
    assignments = run_assignments(root_path, scale, overrides, [paper])
    validate_run(root_path, selected, assignments)  # before anything runs or is written
    guard = WorkspaceGuard(root_path, paper) if assignments else None
    if assignments:
        from tasks.core.scales import set_params

        set_params(root_path, assignments)
    if any(s.gpu for s in selected):
        ensure_gpu_limit()
    ctx = get_run_context()
    flow_run = getattr(ctx, "flow_run", None)
    run_name = getattr(flow_run, "name", None) or f"{paper}-flow"
    parent = ParentRun(root_path, paper, run_name, {
        "prefect_flow_run_id": str(getattr(flow_run, "id", "")), "scale": scale})
    if parent.run_id:
        logger.info("MLflow parent run %s in experiment '%s' (%s)", parent.run_id, paper, parent.link)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    status = "FAILED"
    summary: dict[str, Any] = {}
    try:
        lock_entries: dict[str, Any] = {}
        for st in selected:
            if executor == "pools":
                result = stage_in_pool(st, root_path, assignments, lock_entries, parent.run_id,
                                       stage_timeout)
                lock_entries[st.dvc_name] = result.pop("lock")
            else:
                tags = [GPU_TAG] if st.gpu else []
                result = dvc_stage.with_options(name=st.dvc_name, tags=tags)(
                    st.dvc_name, str(root_path), parent.run_id)
            results.append(result)
        if executor == "pools" and lock_entries:  # bring the outputs into this workspace
            merge_lock(root_path, lock_entries)
            if has_remote(root_path):
                run_dvc(["pull", *lock_entries], root_path, dict(os.environ), logger.info)
            publish_results(root_path, paper)
        status = "FINISHED"
        if assignments:  # kept as a DVC experiment; the workspace itself is restored below
            summary["dvc_experiment"] = save_experiment(root_path, run_name, [r["stage"] for r in results],
                                                        logger.info)
        claims_artifact(root_path, paper, scale, summary)
    finally:
        flow_seconds = time.perf_counter() - start
        stage_seconds = sum(r["stage_seconds"] for r in results)
        timing = {"flow_seconds": flow_seconds, "stage_seconds_sum": stage_seconds,
                  "orchestration_overhead_seconds": flow_seconds - stage_seconds,
                  "stages_run": sum(r["ran"] for r in results),
                  "stages_skipped": sum(r["skipped"] for r in results)}
        summary.update(timing)
        parent.log(timing, {"scale": scale, "stages": ",".join(s.name for s in selected),
                            **{f"override.{k}": v for k, v in assignments.items()}})
        parent.end(status)
        if guard is not None:
            guard.restore(logger.info)
    summary.update({"paper": paper, "scale": scale, "stages": results, "mlflow_parent_run_id": parent.run_id,
                    "executor": executor})
    create_markdown_artifact(key="flow-run-report", markdown=run_report(summary),
                             description=f"{paper}: stages, timings, MLflow parent run, claims")
    logger.info("%s: %d stage(s) ran, %d skipped; flow %.1f s, stage functions %.1f s", paper,
                summary["stages_run"], summary["stages_skipped"], flow_seconds, stage_seconds)
    return summary
