"""Scale-out with Prefect's own machinery: a real server, `cpu` and `gpu` process workers in two
separate clones sharing one DVC remote and one MLflow server; the gpu tag limit; the crash path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_clone

pytestmark = pytest.mark.slow
PAPER = "lowprec_ensemble"


def test_gpu_tagged_tasks_never_overlap_with_limit_one(prefect_harness):
    from prefect import flow, task

    from flows.core import GPU_TAG, ensure_gpu_limit

    assert ensure_gpu_limit(1) >= 1

    @task(tags=[GPU_TAG])
    def heavy(i: int) -> tuple[float, float]:
        start = time.time()
        time.sleep(1.5)
        return start, time.time()

    @flow
    def two_gpu_tasks():
        futures = [heavy.submit(i) for i in range(2)]
        return [f.result() for f in futures]

    (s1, e1), (s2, e2) = sorted(two_gpu_tasks())
    assert s2 >= e1 - 0.05, "two gpu-tagged tasks ran at once under limit 1"


def _stage_processes(repo: Path, stage: str):
    import psutil

    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if f"tasks run {PAPER} {stage}" in cmd and proc.info["cwd"] == str(repo):
                yield proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_killed_stage_fails_the_flow_and_rerun_matches(tmp_path, smoke_repo, mlflow_uri):
    """Kill the stage's process mid-run: the flow run fails in bounded time; the rerun completes
    with the same metrics as an uninterrupted run (the smoke repo's)."""
    from tests.conftest import dvc

    from tasks.core.scales import set_params

    repo = make_clone(tmp_path / "crash")
    env = {**os.environ, "PAPERFLOWS_ROOT": str(repo), "PAPERFLOWS_NO_PROGRESS": "1"}
    # a default run (no overrides: it may update the workspace's dvc.lock), long enough to be killed
    set_params(repo, {f"{PAPER}.train.epochs": 400})
    cmd = [sys.executable, "-m", "flows", PAPER]
    flow_proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        deadline = time.time() + 180
        victims = []
        while time.time() < deadline and not victims and flow_proc.poll() is None:
            victims = list(_stage_processes(repo, "train"))
            time.sleep(0.5)
        assert victims, "the train stage never started"
        time.sleep(2)
        for v in victims:
            v.kill()
        flow_proc.wait(timeout=120)  # bounded: the flow run ends, it does not hang
    finally:
        if flow_proc.poll() is None:
            flow_proc.kill()
    output = flow_proc.stdout.read()
    assert flow_proc.returncode != 0
    assert "Failed" in output or "failed" in output
    assert not (repo / "artifacts" / PAPER / "train").exists()
    set_params(repo, {f"{PAPER}.train.epochs": 2})
    done = subprocess.run([sys.executable, "-m", "flows", PAPER], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert [s["ran"] for s in result["stages"]] == [False, True, True, True]  # prepare was kept
    if not (smoke_repo / "results" / PAPER / "metrics.json").exists():
        dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    ours = json.loads((repo / "results" / PAPER / "metrics.json").read_text())
    ref = json.loads((smoke_repo / "results" / PAPER / "metrics.json").read_text())
    assert ours["headline"] == ref["headline"] and ours["claims_detail"] == ref["claims_detail"]


def test_workers_in_two_clones_share_a_dvc_remote_and_mlflow(tmp_path):
    from flows.serve import (Services, base_env, deploy, free_port, setup_pools_and_limit,
                             start_mlflow_server, start_prefect_server, start_worker)

    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    clones = {}
    for name in ("cpu", "gpu"):
        repo = make_clone(tmp_path / f"clone-{name}", scale="cpu")
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "shared", str(remote)],
                       cwd=repo, check=True, capture_output=True)
        clones[name] = repo
    services = Services(tmp_path / "logs")
    timings = {}
    try:
        t0 = time.time()
        api = start_prefect_server(services, free_port(), tmp_path / "prefect-home", tmp_path)
        timings["server_start"] = time.time() - t0
        mlflow_url = start_mlflow_server(services, free_port(), tmp_path)
        env = base_env(api, mlflow_url, tmp_path / "prefect-home")
        setup_pools_and_limit(api, 1)
        t0 = time.time()
        deploy(env, clones["cpu"])
        timings["deploy"] = time.time() - t0
        for pool, repo in clones.items():
            start_worker(services, pool, repo, env, name=f"{pool}-worker")

        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        override = f"{PAPER}.evaluate.ece_bins=10"
        t0 = time.time()
        with temporary_settings({PREFECT_API_URL: api}):
            run = run_deployment(f"{PAPER}/pipeline", timeout=900, parameters={
                "scale": "smoke", "overrides": [override], "executor": "pools"})
        timings["flow_run"] = time.time() - t0
        logs = "".join(p.read_text(errors="replace")[-4000:] for p in (tmp_path / "logs").glob("*.log"))
        assert run.state.is_completed(), f"{run.state}\n{logs}"
        from flows.core import read_report

        with temporary_settings({PREFECT_API_URL: api}):
            result = read_report(run.id, "flow-run-report")
        by_stage = {s["stage"]: s for s in result["stages"]}
        # GPU-tagged stages ran in the gpu worker's clone, the others in the cpu worker's
        for name, report in by_stage.items():
            want = clones["gpu" if name.endswith(("-train", "-ensemble")) else "cpu"]
            assert report["workspace"] == str(want), (name, report["workspace"])
        # a run with a scale and an override leaves both workspaces as they were ...
        for repo in clones.values():
            status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                                    text=True).stdout
            assert status == "", f"{repo.name} changed:\n{status}"
        # ... and is kept as a DVC experiment whose results came through the DVC remote
        assert result["dvc_experiment"]
        # (exit 255: the clone never ran the other papers, whose outputs it cannot check out)
        subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", result["dvc_experiment"]],
                       cwd=clones["cpu"], capture_output=True)
        metrics_a = clones["cpu"] / "results" / PAPER / "metrics.json"
        assert json.loads(metrics_a.read_text())["claims"]
        # ... which the other clone can pull too
        lock = (clones["cpu"] / "dvc.lock").read_text()
        (clones["gpu"] / "dvc.lock").write_text(lock)
        subprocess.run([sys.executable, "-m", "dvc", "pull", f"{PAPER}-evaluate"], cwd=clones["gpu"],
                       check=True, capture_output=True)
        assert (clones["gpu"] / "artifacts" / PAPER / "evaluate" / "results" / "metrics.json").is_file()
        # MLflow: parent run with one child per stage, the overridden param on the evaluate child
        import mlflow

        client = mlflow.MlflowClient(mlflow_url)
        exp = client.get_experiment_by_name(PAPER)
        children = client.search_runs([exp.experiment_id],
                                      f"tags.mlflow.parentRunId = '{result['mlflow_parent_run_id']}'")
        names = {r.info.run_name: r for r in children}
        assert set(names) == set(by_stage)
        assert names[f"{PAPER}-evaluate"].data.params["ece_bins"] == "10"
        assert names[f"{PAPER}-train"].data.tags["workspace"] == str(clones["gpu"])
        # the run is a DVC experiment in the orchestrating clone
        shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--json"],
                               cwd=clones["cpu"], capture_output=True, text=True).stdout
        assert result["dvc_experiment"] in shown
        print("scale-out timings (s):", {k: round(v, 1) for k, v in timings.items()})
    finally:
        services.stop_all()
    assert not any(p.poll() is None for _, p in services.procs)
