"""The warm stage server: a stage run through it behaves like a fresh ``python -m tasks run`` process
(outputs byte for byte, exit codes, messages, signals), and it goes away when idle or outdated."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_clone
from tests.test_platform import set_param

PAPER = "lowprec_ensemble"


@pytest.fixture()
def server_env():
    """An environment whose stage server is private to this test (its own socket folder, short enough
    for a Unix socket's path)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(tmp), "PAPERFLOWS_STAGE_SERVER": "1",
           "PAPERFLOWS_STAGE_SERVER_IDLE": "60", "PAPERFLOWS_NO_PROGRESS": "1"}
    yield env
    for log in tmp.glob("paperflows-*/*.log"):  # stop the test's server
        for line in log.read_text().splitlines():
            if line.startswith("stage server "):
                try:
                    os.kill(int(line.split()[2]), signal.SIGTERM)
                except ProcessLookupError:
                    pass
    shutil.rmtree(tmp, ignore_errors=True)


def tasks_run(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "run", PAPER, *args], cwd=repo, env=env,
                          capture_output=True, text=True)


def server_log(env: dict) -> str:
    logs = list(Path(env["TMPDIR"]).glob("paperflows-*/*.log"))
    return "".join(p.read_text() for p in logs)


def wait_ready(env: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and "ready on" not in server_log(env):
        time.sleep(0.2)
    assert "ready on" in server_log(env), server_log(env)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_server_runs_stages_like_fresh_processes_byte_for_byte(tmp_path, server_env):
    """The same smoke pipeline in two clean folders, one through the warm server and one with a fresh
    process per stage: every artifact, result and dvc.lock entry is identical."""
    warm, fresh = make_clone(tmp_path / "warm"), make_clone(tmp_path / "fresh")
    first = tasks_run(warm, server_env, "prepare", "--no-mlflow")  # no server yet: runs here, starts one
    assert first.returncode == 0, first.stderr
    wait_ready(server_env)
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", f"{PAPER}-evaluate"], cwd=warm,
                         env=server_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{PAPER}-evaluate done in" in out.stdout + out.stderr  # the child's output reaches DVC
    assert f"run {PAPER} evaluate in {warm}" in server_log(server_env)  # it really ran in the server
    off = {**server_env, "PAPERFLOWS_STAGE_SERVER": "0"}
    subprocess.run([sys.executable, "-m", "dvc", "repro", f"{PAPER}-evaluate"], cwd=fresh, env=off,
                   check=True, capture_output=True)
    assert f"in {fresh}" not in server_log(server_env)
    assert tree_digest(warm / "artifacts") == tree_digest(fresh / "artifacts")
    assert tree_digest(warm / "results") == tree_digest(fresh / "results")
    assert (warm / "dvc.lock").read_text() == (fresh / "dvc.lock").read_text()


def test_server_passes_exit_codes_messages_and_signals(tmp_path, server_env, mlflow_uri):
    import mlflow

    repo = make_clone(tmp_path / "repo")
    env = {**server_env, "MLFLOW_TRACKING_URI": mlflow_uri}
    assert tasks_run(repo, env, "prepare", "--no-mlflow").returncode == 0
    wait_ready(env)
    set_param(repo, f"{PAPER}.train.epochs", -1)
    bad = tasks_run(repo, env, "train")
    assert bad.returncode == 2 and f"{PAPER}.train.epochs" in bad.stderr
    assert "child " in server_log(env)
    set_param(repo, f"{PAPER}.train.epochs", 400)
    parent = repo / "artifacts" / PAPER
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGKILL, -9)):
        proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", PAPER, "train"], cwd=repo, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not any(p.name.startswith(".train.tmp-") for p in parent.iterdir()):
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        if sig == signal.SIGTERM:
            assert "terminated" in proc.stderr.read()
        deadline = time.time() + 30  # a dead client's stage ends itself (SIGTERM) and cleans up
        while time.time() < deadline and any(".tmp-" in p.name for p in parent.iterdir()):
            time.sleep(0.2)
        assert not any(".tmp-" in p.name for p in parent.iterdir())
        assert not (parent / "train").exists()
    mlflow.set_tracking_uri(mlflow_uri)
    deadline = time.time() + 30
    runs = []
    while time.time() < deadline:
        runs = mlflow.search_runs(experiment_names=[PAPER], filter_string=f"tags.workspace = '{repo}' and "
                                  f"tags.dvc_stage = '{PAPER}-train'")
        if sorted(runs["status"]) == ["KILLED", "KILLED"]:
            break
        time.sleep(0.5)
    assert sorted(runs["status"]) == ["KILLED", "KILLED"]  # even the SIGKILLed client's run ends KILLED


def test_server_exits_when_idle_and_is_replaced_when_its_environment_changes(tmp_path, server_env):
    from tasks import stageserver

    repo = make_clone(tmp_path / "repo")
    env = {**server_env, "PAPERFLOWS_STAGE_SERVER_IDLE": "5"}
    sockets = lambda: {p.name for p in Path(env["TMPDIR"]).glob("paperflows-*/*.sock")}
    assert tasks_run(repo, env, "prepare", "--no-mlflow").returncode == 0
    wait_ready(env)
    first = sockets()
    assert len(first) == 1
    changed = {**env, "OMP_NUM_THREADS": "1"}  # read by libraries at import time: a new server
    assert tasks_run(repo, changed, "prepare", "--no-mlflow").returncode == 0
    seen, deadline = set(first), time.time() + 120
    while time.time() < deadline and len(seen) < 2:
        seen |= sockets()
        time.sleep(0.2)
    assert len(seen) == 2
    deadline = time.time() + 60
    while time.time() < deadline and sockets():
        time.sleep(0.5)
    assert not sockets()  # both idle out and remove their sockets
    assert stageserver.fingerprint() != ""


def test_a_long_temp_folder_still_gives_a_usable_socket_path(tmp_path, monkeypatch):
    from tasks import stageserver

    import tempfile

    long_tmp = tmp_path / ("x" * 120)
    long_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(long_tmp)
    path = stageserver.socket_path()
    assert len(path) <= 100 and os.path.isdir(os.path.dirname(path))
