"""Offline defaults and the project root.

Imported first by every entry point (``python -m tasks``, ``python -m flows``, tests) so the
environment is set before prefect, mlflow or transformers are imported.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def is_project_root(path: Path) -> bool:
    return (path / "params.yaml").is_file() and (path / "dvc.yaml").is_file()


def find_root(start: Path | None = None) -> Path:
    """The project root: ``$PAPERFLOWS_ROOT``, ``$DVC_ROOT``, or the nearest folder above ``start``
    (default: the working directory) holding ``params.yaml`` and ``dvc.yaml``; else the checkout this
    package lives in."""
    for var in ("PAPERFLOWS_ROOT", "DVC_ROOT"):
        if os.environ.get(var):
            return Path(os.environ[var]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if is_project_root(folder):
            return folder
    return Path(__file__).resolve().parents[2]


def tracking_uri(root: Path) -> str:
    """MLflow store anchored at the repo root (absolute, so DVC temp workspaces share it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def apply_offline_defaults(root: Path | None = None) -> Path:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    root = root or find_root()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    return root
