"""Shared fixtures: a smoke-scale git+DVC clone of the project, a private MLflow store, the
Prefect test harness (one per session)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PAPERFLOWS_NO_PROGRESS", "1")
os.environ.setdefault("PAPERFLOWS_THREADS", "1")  # tiny smoke models: threads only add overhead
os.environ.setdefault("PAPERFLOWS_STAGE_SERVER_IDLE", "120")
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # stages write __pycache__ beside their code, as for users  # the suite's stage server leaves soon after it


def project_files(root: Path = ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the checkout."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (root / f).is_file()]


def make_clone(dest: Path, scale: str = "smoke", papers: list[str] | None = None) -> Path:
    """Copy the project into ``dest`` as a fresh git repo with DVC, switched to ``scale``."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        if rel.startswith(("results/", "docs/")) or rel == "dvc.lock":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True, text=True)
    run("git", "init", "-q", "-b", "main")
    if scale != "cpu":
        cmd = [sys.executable, "-m", "tasks", "scale", scale]
        for p in papers or []:
            cmd += ["--paper", p]
        run(*cmd)
    run("git", "add", "-A")
    run("git", "commit", "-qm", f"clone at {scale} scale")
    return dest


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory, mlflow_uri) -> Path:
    return make_clone(tmp_path_factory.mktemp("smoke") / "repo")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# dvc.yaml commands call `python`: make it this interpreter (the project's venv)
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PAPERFLOWS_NO_PROGRESS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tasks_cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PAPERFLOWS_NO_PROGRESS": "1"})


def run_flow_with_children(flow_fn, paper: str, stages: list[str], repo: Path, monkeypatch,
                           mlflow_uri: str):
    """Run a paper's flow on ``repo``; assert every stage ran, in order, as an MLflow child run of the
    flow's parent run. Returns the flow's summary and the child runs (a DataFrame)."""
    import mlflow

    names = [f"{paper}-{s}" for s in stages]
    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    result = flow_fn()
    assert [s["stage"] for s in result["stages"]] == names
    assert all(s["ran"] for s in result["stages"])
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=[paper],
                              filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_parent_run_id']}'")
    assert sorted(runs["tags.mlflow.runName"]) == sorted(names)
    return result, runs


def snapshot_outputs(repo: Path, paper: str) -> dict[str, bytes]:
    """Every file of results/<paper>/ and artifacts/<paper>/ (relative path -> bytes)."""
    out = {}
    for top in (repo / "results" / paper, repo / "artifacts" / paper):
        for path in sorted(top.rglob("*")) if top.is_dir() else []:
            if path.is_file():
                out[str(path.relative_to(repo))] = path.read_bytes()
    return out


def assert_poisoned_param_keeps_outputs(repo: Path, paper: str, stage: str = "evaluate") -> None:
    """Poison one number of ``paper.stage`` in params.yaml: `dvc repro <paper>-evaluate` fails with the
    stage's exit code 2 and a message naming the key, and results/<paper>/ and every artifact folder
    of the paper are byte-identical to before (DVC keeps persisted outputs; the stage writes nothing)."""
    import yaml

    before = snapshot_outputs(repo, paper)
    assert any(k.startswith("results/") for k in before), "run the paper first"
    original = (repo / "params.yaml").read_bytes()
    data = yaml.safe_load(original)
    section = data[paper][stage]
    key = next(k for k, v in section.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    section[key] = "poison"
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        proc = dvc(repo, "repro", f"{paper}-evaluate", check=False)
    finally:
        (repo / "params.yaml").write_bytes(original)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exited with 2" in text, text[-2000:]
    assert f"'{paper}.{stage}.{key}' = 'poison'" in text, text[-2000:]
    assert snapshot_outputs(repo, paper) == before
