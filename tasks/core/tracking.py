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
        mlflow.set_experiment(experiment)
        parent = os.environ.get(PARENT_RUN_ENV) or None
        self.run = mlflow.start_run(run_name=run_name, parent_run_id=parent, nested=parent is not None,
                                    tags=tags)

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
