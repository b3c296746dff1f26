"""vp_gcnn end to end at smoke scale: dvc repro, every claim re-derived from its details, the gates, a poisoned
param, the Prefect flow with MLflow child runs, and the paper-scale digit-folder loader on tiny generated files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "vp_gcnn"
STAGES = ["prepare", "train", "evaluate"]
CLAIMS = {"gcnn_capped", "vp_input_aware", "vp_beats_partial_and_gcnn", "vp_better_calibrated", "vp_colour_tail"}
GATES = {"gcnn_invariant", "backbone_learns", "colour_backbone_learns"}


@pytest.fixture(scope="module")
def reproduced(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    return smoke_repo


def test_dvc_repro_writes_claims_that_follow_from_their_details(reproduced):
    from tasks.core.claims import rederive

    results = reproduced / "results" / PAPER
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics) == {"claims", "claims_detail", "gates", "headline"}
    assert set(metrics["claims"]) == CLAIMS
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
        assert metrics["claims_detail"][name]["n"] in (1, 2)  # two smoke seeds (1: a per-seed bootstrap part)
    assert set(metrics["gates"]) == GATES
    assert metrics["gates"]["gcnn_invariant"]["passed"] is True  # exact C_4 invariance holds even untrained
    assert 0.6 < metrics["headline"]["invariant_ceiling"] < 0.7
    evidence = json.loads((results / "evidence.json").read_text())
    theta = evidence["theta_per_class"]["digits67"]["vp"]
    assert set(theta) == {"0", "1"} and set(theta["0"]) == {"6", "6_rotated", "7"}
    assert len(theta["0"]["7"]) == 2  # theta at every group layer
    assert evidence["lambda_sweep"]["chosen"]["vp"] == 0.01
    for png in ("theta_histograms_digits67.png", "accuracy_ece.png", "kept_hue.png"):
        assert (results / "plots" / png).stat().st_size > 1000
    runs = json.loads((reproduced / "artifacts" / PAPER / "train" / "runs.json").read_text())
    assert len(runs["runs"]) == 2 * (4 + 4 + 5)


def test_gate_failure_makes_claims_untestable():
    from tasks.core.claims import gate

    assert not gate("backbone_learns", 0.5, 0.9).passed  # decide() hands failed gates to the claims


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(reproduced):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    assert_poisoned_param_keeps_outputs(reproduced, PAPER)


def test_second_repro_does_nothing(reproduced):
    out = dvc(reproduced, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out


def test_prefect_flow_logs_parent_and_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    from flows.vp_gcnn import vp_gcnn
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(vp_gcnn, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    train = runs[runs["tags.mlflow.runName"] == f"{PAPER}-train"].iloc[0]
    assert train["params.workers"] == "1" and train["metrics.stage_seconds"] > 0
    assert "metrics.effect_gcnn_capped" in runs.columns
    again = vp_gcnn()
    assert not any(s["ran"] for s in again["stages"])


def test_paper_scale_digit_folder_loader(tmp_path):
    """scales/paper.yaml's source 'folder' reads <folder>/<digit>/<image>.png through the same prepare stage."""
    import yaml
    from PIL import Image

    from tasks.core import run_stage
    from tasks.core.params import deep_merge
    from tests.conftest import ROOT

    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist_png"
    for d in range(10):
        (folder / str(d)).mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(folder / str(d) / f"{i}.png")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]
    params = deep_merge(params, {PAPER: paper})
    params[PAPER]["prepare"].update(folder=str(folder), val_fraction=0.25, colour_val_per_cell=1,
                                    colour_test_per_cell=1, colour_max_train=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    run_stage(PAPER, "prepare", root=tmp_path, track=False)
    out = tmp_path / "artifacts" / PAPER / "prepare"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "folder" and meta["image_size"] == 40
    with np.load(out / "colour.npz") as f:
        assert f["x_test"].shape == (30, 3, 40, 40)
    with np.load(out / "digits67.npz") as f:
        assert f["x_train"].shape[1:] == (1, 40, 40) and set(np.unique(f["y_train"])) == {0, 1, 2}
