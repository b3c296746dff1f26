"""MLflow inside the stage: a child run of the flow's parent run when one exists, else top-level."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

PARENT_RUN_ENV = "PAPERFLOWS_MLFLOW_PARENT_RUN_ID"
TRACKING_DISABLED_ENV = "PAPERFLOWS_NO_MLFLOW"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def end_orphaned_runs(experiment_id: str, dvc_stage: str, workspace: str) -> int:
    """Mark KILLED the runs of ``dvc_stage`` in ``workspace`` still RUNNING although their process is
    gone (a stage killed with SIGKILL cannot end its own run); returns how many were ended."""
    import mlflow

    client = mlflow.MlflowClient()
    query = (f"tags.dvc_stage = '{dvc_stage}' and attributes.status = 'RUNNING'"
             + (f" and tags.workspace = '{workspace}'" if workspace else ""))
    ended = 0
    for run in client.search_runs([experiment_id], query, max_results=50):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and _alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        ended += 1
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is gone for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class Tracker:
    """A thin wrapper over one MLflow run; every call is a no-op when tracking is disabled."""

    def __init__(self, root: Path, experiment: str, run_name: str, tags: dict[str, str],
                 enabled: bool = True):
        self.enabled = enabled and os.environ.get(TRACKING_DISABLED_ENV, "") not in ("1", "true")
        self.run = None
        if not self.enabled:
            return
        from .settings import tracking_uri
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(root))
        exp = mlflow.set_experiment(experiment)
        end_orphaned_runs(exp.experiment_id, tags.get("dvc_stage", run_name), tags.get("workspace", ""))
        parent = os.environ.get(PARENT_RUN_ENV) or None
        self.run = mlflow.start_run(run_name=run_name, parent_run_id=parent, nested=parent is not None,
                                    tags={**tags, "pid": str(os.getpid())})

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run:
            items = list(flat_params(params).items())
            for i in range(0, len(items), 100):
                self.mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run:
            clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if clean:
                self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run and Path(path).exists():
            if Path(path).is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path)
            else:
                self.mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run:
            self.mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        if self.run:
            self.mlflow.end_run(status=status)
            self.run = None
