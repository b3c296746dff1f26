"""A flow run with a scale or overrides never changes the workspace: params.yaml, dvc.lock and
results/ stay as committed, whether the run succeeds, fails mid-way or is given an invalid override;
the run is kept as a DVC experiment and an MLflow parent run with its `override.*` params."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import make_clone

pytestmark = pytest.mark.slow
PAPER = "lowprec_ensemble"


def git_status(repo) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_clone(tmp_path_factory.mktemp("workspace") / "repo", scale="cpu")


def test_smoke_run_with_an_override_leaves_the_workspace_unchanged(repo, prefect_harness, mlflow_uri,
                                                                   monkeypatch):
    import mlflow

    from flows.lowprec_ensemble import lowprec_ensemble

    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    params = (repo / "params.yaml").read_bytes()
    result = lowprec_ensemble(scale="smoke", overrides=[f"{PAPER}.evaluate.ece_bins=10"])
    assert all(s["ran"] for s in result["stages"]) and result["claims"]
    assert git_status(repo) == ""
    assert (repo / "params.yaml").read_bytes() == params
    assert not (repo / "dvc.lock").exists() and not (repo / "results" / PAPER).exists()
    shown = subprocess.run(["dvc", "exp", "show", "--no-pager", "--json"], cwd=repo, capture_output=True,
                           text=True).stdout
    assert result["dvc_experiment"] in shown
    mlflow.set_tracking_uri(mlflow_uri)
    parent = mlflow.get_run(result["mlflow_parent_run_id"])
    assert parent.data.params[f"override.{PAPER}.evaluate.ece_bins"] == "10"
    assert parent.data.params[f"override.{PAPER}.train.epochs"] == "2"  # the smoke scale


def test_invalid_override_fails_before_any_stage_and_names_the_key(repo, prefect_harness, mlflow_uri,
                                                                   monkeypatch):
    from flows.lowprec_ensemble import lowprec_ensemble
    from tasks.core.errors import ParamsError

    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    with pytest.raises(ParamsError, match=r"'lowprec_ensemble\.ensemble\.bits' = \[0\].*between 2 and 32"):
        lowprec_ensemble(scale="smoke", overrides=[f"{PAPER}.ensemble.bits=[0]"])
    with pytest.raises(ParamsError, match="'nope' is not a section"):
        lowprec_ensemble(overrides=["nope.x=1"])
    assert git_status(repo) == ""


def test_run_failing_mid_way_leaves_the_workspace_unchanged(repo, prefect_harness, mlflow_uri, monkeypatch):
    from flows.lowprec_ensemble import lowprec_ensemble

    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    params = (repo / "params.yaml").read_bytes()
    with pytest.raises(Exception, match="claim_size"):  # valid alone; evaluate rejects it against ensemble
        lowprec_ensemble(scale="smoke", overrides=[f"{PAPER}.evaluate.claim_size=99"])
    assert git_status(repo) == ""
    assert (repo / "params.yaml").read_bytes() == params
