"""modular_lora end to end at smoke scale: dvc repro and the Prefect flow with MLflow child runs."""
from __future__ import annotations

import json

import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "modular_lora"
STAGES = ["prepare", "pretrain", "safety", "finetune", "evaluate"]
CLAIMS = {"safety_works", "finetuning_backfires", "modular_lora_keeps_safety", "modular_lora_learns_task"}


@pytest.fixture(scope="module")
def reproduced(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    return smoke_repo


def test_dvc_repro_writes_claims_histograms_and_plots(reproduced):
    from tasks.core.claims import rederive

    res = reproduced / "results" / PAPER
    metrics = json.loads((res / "metrics.json").read_text())
    assert set(metrics) == {"claims", "claims_detail", "gates", "headline"}
    assert CLAIMS <= set(metrics["claims"])
    assert all(v in (True, False, None) for v in metrics["claims"].values())
    # every verdict follows from its own effect, CI and margin (or its failed gate)
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
    evidence = json.loads((res / "evidence.json").read_text())
    parts = evidence["claims"]["safety_works_esd"]["parts"]  # the long form: every part of an all_of
    assert parts["erased"]["margin"] == 0.0 and parts["erased"]["direction"] == "<" and parts["erased"]["n"] == 1
    assert evidence["claims"]["finetuning_backfires_esd"]["parts"]["full_rises"]["margin"] == 0.1
    for name, claim in evidence["claims"].items():  # each part re-derives too
        for part in claim.get("parts", {}).values():
            if "parts" not in part:
                assert rederive(part) == part["verdict"], name
    assert {"w0_quality", "w0_draws_concept"} == set(metrics["gates"])
    assert metrics["gates"]["w0_quality"]["threshold"] == 0.8
    for g in metrics["gates"].values():
        assert g["passed"] == (g["value"] >= g["threshold"])
    assert 0 <= metrics["headline"]["harmful"]["esd"]["modular"] <= 1
    assert evidence["summary"] and evidence["seeds"] == [0]
    for obj, s in evidence["summary"].items():
        assert {"base", "safe", "full", "lora_on_safe", "modular", "W0_plus_ft", "W0_minus_safe",
                "W0_plus_safe_minus_ft"} <= set(s)
        # the harmful rate is scored on [plain, c] alone; [new, c] is reported beside it; the model arithmetic
        # reads only the concept prompt
        assert {"harmful", "harmful_new", "acc_other_plain"} <= set(s["safe"])
        assert set(s["W0_minus_safe"]) == {"harmful"}
    fractions = evidence["reemergence_fraction"]["esd"]
    assert set(fractions) == {"full", "lora_on_safe", "modular"}
    assert all({"estimate", "ci", "n", "per_seed"} <= set(v) for v in fractions.values())
    hists = json.loads((res / "histograms.json").read_text())
    h = hists["modular_esd_s0"]["plain"]
    assert len(h) == 10 and all(abs(sum(row) - 1) < 1e-3 for row in h)  # every prompt's class shares
    for png in ("harmful_rate_per_arm.png", "reemergence_curve.png", "class_histograms.png", "samples_grid.png"):
        assert (res / "plots" / png).stat().st_size > 1000
    curve = json.loads((res / "curves" / "reemergence.json").read_text())
    assert curve and {"arm", "step", "harmful_plain", "harmful_new"} == set(curve[0])


def test_bad_params_stop_before_compute(reproduced):
    import yaml

    from tests.conftest import tasks_cli

    path = reproduced / "params.yaml"
    text = path.read_text()
    try:
        for stage, key, value in (("prepare", "concept", 12), ("pretrain", "guidance", 0.5),
                                  ("safety", "rank", 0), ("prepare", "finetune_digits", [])):
            params = yaml.safe_load(text)
            params[PAPER][stage][key] = value
            path.write_text(yaml.safe_dump(params))
            out = tasks_cli(reproduced, "run", PAPER, stage)
            assert out.returncode == 2, out.stderr
            assert key in out.stdout + out.stderr
    finally:
        path.write_text(text)


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(smoke_repo):
    from tests.conftest import assert_poisoned_param_keeps_outputs, dvc as _dvc

    _dvc(smoke_repo, "repro", f"{PAPER}-evaluate")  # up to date after the test above
    assert_poisoned_param_keeps_outputs(smoke_repo, PAPER)


def test_prefect_flow_runs_every_stage_as_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    import mlflow

    from flows.modular_lora import modular_lora
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(modular_lora, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    evaluate = runs[runs["tags.mlflow.runName"] == f"{PAPER}-evaluate"].iloc[0]
    arts = mlflow.artifacts.list_artifacts(run_id=evaluate["run_id"], artifact_path="results/plots")
    assert any(a.path.endswith("samples_grid.png") for a in arts)
