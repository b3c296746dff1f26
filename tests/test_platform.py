"""The platform's promises: clear errors with exit code 2 and nothing written, atomic outputs,
a killed stage leaves nothing partial behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.core import io
from tasks.core.errors import ParamsError, UnknownPaperError, UnknownStageError
from tasks.core.params import validate_section
from tasks.core.registry import get_stage
from tests.conftest import ROOT, make_clone, tasks_cli


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_uri):
    return make_clone(tmp_path_factory.mktemp("platform") / "repo")


def set_param(repo: Path, dotted: str, value) -> None:
    data = yaml.safe_load((repo / "params.yaml").read_text())
    node = data
    *keys, last = dotted.split(".")
    for k in keys:
        node = node[k]
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_unknown_paper_and_stage_are_named_with_a_suggestion():
    with pytest.raises(UnknownPaperError, match="lowprec_ensembel.*Did you mean 'lowprec_ensemble'"):
        get_stage("lowprec_ensembel", "train")
    with pytest.raises(UnknownStageError, match="'trian'.*Did you mean 'train'"):
        get_stage("lowprec_ensemble", "trian")


@pytest.mark.parametrize("args", [["run", "nope", "train"], ["run", "lowprec_ensemble", "nope"]])
def test_cli_unknown_names_exit_2(args):
    proc = tasks_cli(ROOT, *args)
    assert proc.returncode == 2
    assert "error: Unknown" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage,key,value,needle", [
    ("train", "lr", -0.1, "'lowprec_ensemble.train.lr' = -0.1"),
    ("train", "epochs", "many", "'lowprec_ensemble.train.epochs' = 'many'"),
    ("train", "epocs", 3, "'lowprec_ensemble.train.epocs' is not a parameter"),
    ("train", "epochs", KeyError, "'lowprec_ensemble.train.epochs' is missing"),
    ("ensemble", "bits", [0], "bits must be between 2 and 32"),
    ("ensemble", "bits", [33], "bits must be between 2 and 32"),
    ("ensemble", "sizes", [0], "ensemble sizes must be >= 1"),
    ("train", "seeds", [], "'lowprec_ensemble.train.seeds'"),
])
def test_invalid_params_name_the_key(stage, key, value, needle):
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["lowprec_ensemble"][stage]
    if value is KeyError:
        section.pop(key)
    else:
        section[key] = value
    st = get_stage("lowprec_ensemble", stage)
    with pytest.raises(ParamsError) as err:
        validate_section("lowprec_ensemble", stage, st.params, section)
    assert needle in str(err.value)
    assert "Fix params.yaml" in str(err.value)


def test_invalid_param_via_cli_exits_2_and_writes_nothing(repo, tmp_path):
    bad = make_clone(tmp_path / "bad")
    set_param(bad, "lowprec_ensemble.prepare.val_fraction", 3)
    proc = tasks_cli(bad, "run", "lowprec_ensemble", "prepare")
    assert proc.returncode == 2, proc.stderr
    assert "lowprec_ensemble.prepare.val_fraction" in proc.stderr
    assert not (bad / "artifacts").exists()


def test_invalid_global_params(tmp_path):
    bad = make_clone(tmp_path / "bad")
    set_param(bad, "seed", -1)
    proc = tasks_cli(bad, "run", "lowprec_ensemble", "prepare")
    assert proc.returncode == 2 and "'seed' = -1" in proc.stderr


def test_missing_upstream_artifact_names_the_stage_to_run(repo):
    proc = tasks_cli(repo, "run", "lowprec_ensemble", "evaluate")
    assert proc.returncode == 2
    assert "artifacts/lowprec_ensemble/ensemble" in proc.stderr
    assert "dvc repro lowprec_ensemble-ensemble" in proc.stderr
    assert not (repo / "results" / "lowprec_ensemble").exists()


def test_atomic_file_keeps_the_old_content_on_failure(tmp_path):
    path = tmp_path / "m.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_file(path, "w") as fh:
            fh.write('{"half": ')
            raise RuntimeError("killed")
    assert io.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_commit_dir_swaps_whole_folders(tmp_path):
    final = tmp_path / "stage"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = io.new_tmp_dir(final)
    (tmp / "new.txt").write_text("new")
    io.commit_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_killed_stage_leaves_no_partial_output_and_rerun_completes(tmp_path):
    repo = make_clone(tmp_path / "kill")
    set_param(repo, "lowprec_ensemble.train.epochs", 400)  # long enough to be killed mid-run
    env = {**os.environ, "PAPERFLOWS_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "prepare", "--no-mlflow"],
                   cwd=repo, env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "train",
                             "--no-mlflow"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = repo / "artifacts" / "lowprec_ensemble"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".train.tmp-") for p in parent.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (parent / "train").exists()  # nothing DVC could record as the stage's output
    set_param(repo, "lowprec_ensemble.train.epochs", 2)
    done = subprocess.run([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "train",
                           "--no-mlflow"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (parent / "train" / "meta.json").is_file()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]  # leftovers cleaned


def test_flows_cli_help_and_unknown_paper():
    import subprocess as sp

    helped = sp.run([sys.executable, "-m", "flows", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "lowprec_ensemble" in helped.stdout
    bad = sp.run([sys.executable, "-m", "flows", "lowprec_ensembel"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Did you mean 'lowprec_ensemble'" in bad.stderr


def test_scale_switch_rewrites_params_and_keeps_comments(tmp_path):
    repo = make_clone(tmp_path / "scale", scale="cpu")
    before = (repo / "params.yaml").read_text()
    proc = tasks_cli(repo, "scale", "smoke")
    assert proc.returncode == 0, proc.stderr
    after = (repo / "params.yaml").read_text()
    assert "# base seed of every stage" in after
    data = yaml.safe_load(after)
    assert data["lowprec_ensemble"]["train"]["epochs"] == 2
    assert data["lowprec_ensemble"]["train"]["model_dir"] is None
    assert before != after
    flags = tasks_cli(repo, "scale", "paper", "--print").stdout
    assert "-S 'lowprec_ensemble.train.model=pretrained'" in flags


def test_map_jobs_keeps_order_uses_one_thread_per_worker_and_raises_failures():
    from tasks.core.parallel import map_jobs
    from tests._jobs import square as _square_in_worker

    seen = []
    out = map_jobs(_square_in_worker, [3, 1, 2], workers=2, on_result=lambda i, r: seen.append(i))
    assert [r[0] for r in out] == [9, 1, 4]
    assert all(r[1] == 1 for r in out)
    assert sorted(seen) == [0, 1, 2]
    assert [r[0] for r in map_jobs(_square_in_worker, [3, 1], workers=1)] == [9, 1]  # in-process path
    # a job that seeds torch's global generator itself gives the same result inline and in a worker
    from tests._jobs import seeded_draw

    assert map_jobs(seeded_draw, [3, 1, 2], workers=2) == map_jobs(seeded_draw, [3, 1, 2], workers=1)
    with pytest.raises(ValueError, match="job -1 failed"):
        map_jobs(_square_in_worker, [1, -1], workers=2)
    with pytest.raises(ValueError, match="workers"):
        map_jobs(_square_in_worker, [1], workers=0)


def test_only_dvc_lock_errors_before_a_stage_ran_are_retried():
    from flows.core import dvc_lock_error

    assert dvc_lock_error("ERROR: Unable to acquire lock. Most likely another DVC process is running")
    assert dvc_lock_error("ERROR: failed to reproduce 'x-prepare': '/r/a' is busy, it is being blocked by: (PID 9)")
    # a stage's own output (MLflow's SQLite) is no DVC lock error, and a finished stage is never re-run
    assert not dvc_lock_error("sqlite3.OperationalError: database is locked\nERROR: failed to reproduce")
    assert not dvc_lock_error("Running stage 'x-train':\n[paperflows] x-train done in 3.0 s\n"
                              "ERROR: Unable to acquire lock")


def _sleep_and_report(path: str) -> None:
    """A job that keeps writing its pid's heartbeat until killed."""
    import os as _os
    import time as _time

    while True:
        Path(path).write_text(f"{_os.getpid()} {_time.time()}")
        _time.sleep(0.1)


def test_killed_stage_process_takes_its_workers_with_it(tmp_path):
    """SIGKILL of the process running ctx.map: no worker keeps running (and writing) after it."""
    import psutil

    script = (f"from tasks.core.parallel import map_jobs\n"
              f"from tests.test_platform import _sleep_and_report\n"
              f"map_jobs(_sleep_and_report, [{str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}], workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
        time.sleep(0.2)
    pids = [int((tmp_path / n).read_text().split()[0]) for n in "ab"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_sigterm_ends_the_mlflow_run_killed_and_sigkill_orphans_are_ended_next_time(tmp_path, mlflow_uri):
    import mlflow

    repo = make_clone(tmp_path / "term")
    set_param(repo, "lowprec_ensemble.train.epochs", 400)
    # a stage in its own process (no warm server: through it, a SIGKILLed client's run ends KILLED at
    # once, tested in test_stageserver.py)
    env = {**os.environ, "PAPERFLOWS_NO_PROGRESS": "1", "MLFLOW_TRACKING_URI": mlflow_uri,
           "PAPERFLOWS_STAGE_SERVER": "0"}
    subprocess.run([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "prepare", "--no-mlflow"],
                   cwd=repo, env=env, check=True, capture_output=True)
    mlflow.set_tracking_uri(mlflow_uri)

    def start_train_and(sig):
        proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "train"], cwd=repo,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        parent = repo / "artifacts" / "lowprec_ensemble"
        deadline = time.time() + 120
        while time.time() < deadline and not any(p.name.startswith(".train.tmp-") for p in parent.iterdir()):
            time.sleep(0.2)
        time.sleep(1.5)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        proc.err = proc.stderr.read()
        return proc

    def train_runs():
        return mlflow.search_runs(experiment_names=["lowprec_ensemble"],
                                  filter_string=f"tags.workspace = '{repo}' and tags.dvc_stage = "
                                                f"'lowprec_ensemble-train'")

    proc = start_train_and(signal.SIGTERM)
    assert proc.returncode == 143 and "terminated" in proc.err
    assert list(train_runs()["status"]) == ["KILLED"]
    assert not (repo / "artifacts" / "lowprec_ensemble" / "train").exists()
    start_train_and(signal.SIGKILL)
    assert sorted(train_runs()["status"]) == ["KILLED", "RUNNING"]  # a SIGKILLed run cannot end itself
    set_param(repo, "lowprec_ensemble.train.epochs", 2)
    subprocess.run([sys.executable, "-m", "tasks", "run", "lowprec_ensemble", "train"], cwd=repo, env=env,
                   check=True, capture_output=True)
    assert sorted(train_runs()["status"]) == ["FINISHED", "KILLED", "KILLED"]


def test_gpu_check_audits_devices_and_says_when_there_is_no_gpu():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import DeviceAudit

    audit = DeviceAudit()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(audit)
    try:
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))(torch.zeros(3, 2))
    finally:
        handle.remove()
    assert audit.calls == 3
    assert "Linear: parameter weight on cpu" in audit.violations
    assert "BatchNorm1d: buffer running_mean on cpu" in audit.violations
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True,
                             text=True)
        assert out.returncode == 3 and "no CUDA device" in out.stderr
