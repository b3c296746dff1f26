"""lowprec_ensemble end to end at smoke scale: dvc repro, experiments, the Prefect flow with its
MLflow parent/child runs, and the paper-scale ViT code path on a tiny saved model."""
from __future__ import annotations

import json

import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "lowprec_ensemble"
STAGES = ["prepare", "train", "ensemble", "evaluate"]


@pytest.fixture(scope="module")
def reproduced(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    return smoke_repo


def test_dvc_repro_writes_metrics_with_claims(reproduced):
    metrics = json.loads((reproduced / "results" / PAPER / "metrics.json").read_text())
    assert set(metrics["claims"]) >= {"ambiguity_positive", "ambiguity_grows_as_bits_drop",
                                      "ensemble_beats_members", "lpe_error_le_rtn_low_bits",
                                      "lpe_adds_to_snapshots"}
    assert all(isinstance(v, bool) for v in metrics["claims"].values())
    # claims are computed from the numbers stored beside them
    amb = metrics["evidence"]["ambiguity_by_bits"]
    assert metrics["claims"]["ambiguity_positive"] == all(v > 0 for v in amb.values())
    for png in ("nll_vs_size.png", "nll_vs_memory.png"):
        assert (reproduced / "results" / PAPER / "plots" / png).stat().st_size > 1000
    shown = dvc(reproduced, "metrics", "show", "--json").stdout
    assert "ambiguity_positive" in shown


def test_second_repro_does_nothing(reproduced):
    out = dvc(reproduced, "repro", f"{PAPER}-evaluate").stdout
    assert "didn't change" in out or "is up to date" in out
    assert "Running stage" not in out


def test_dvc_exp_run_with_a_param_override(reproduced):
    out = dvc(reproduced, "exp", "run", "-S", f"{PAPER}.evaluate.ece_bins=10", f"{PAPER}-evaluate").stdout
    assert f"Running stage '{PAPER}-evaluate'" in out
    assert f"Running stage '{PAPER}-train'" not in out  # only the changed stage re-runs
    shown = dvc(reproduced, "exp", "show", "--no-pager", "--json").stdout
    assert "ece_bins" in shown
    # back to the committed params, so later tests compare against the default smoke run
    dvc(reproduced, "exp", "run", "-S", f"{PAPER}.evaluate.ece_bins=15", f"{PAPER}-evaluate")


def test_prefect_flow_logs_parent_and_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    import mlflow

    from flows.lowprec_ensemble import lowprec_ensemble
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(lowprec_ensemble, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    parent_id = result["mlflow_parent_run_id"]
    train = runs[runs["tags.mlflow.runName"] == f"{PAPER}-train"].iloc[0]
    assert train["params.epochs"] == "2" and train["tags.gpu_stage"] == "true"
    assert train["metrics.stage_seconds"] > 0
    evaluate = runs[runs["tags.mlflow.runName"] == f"{PAPER}-evaluate"].iloc[0]
    assert "metrics.amb_b3" in runs.columns and evaluate["metrics.amb_b3"] > 0
    arts = mlflow.artifacts.list_artifacts(run_id=evaluate["run_id"], artifact_path="results/plots")
    assert any(a.path.endswith("nll_vs_size.png") for a in arts)
    parent = mlflow.get_run(parent_id)
    assert parent.data.metrics["stages_run"] == 4
    # a second flow run: DVC skips everything and no child runs are logged
    again = lowprec_ensemble()
    assert not any(s["ran"] for s in again["stages"])
    children = mlflow.search_runs(experiment_names=[PAPER],
                                  filter_string=f"tags.mlflow.parentRunId = '{again['mlflow_parent_run_id']}'")
    assert len(children) == 0


def test_paper_scale_vit_path_on_a_tiny_saved_model(tmp_path, mlflow_uri):
    """The paper-scale loaders (image folder + from_pretrained ViT) on a tiny random ViT."""
    import numpy as np
    import yaml
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from tasks.core import run_stage
    from tests.conftest import ROOT

    model_dir = tmp_path / "vit"
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (images / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / c / f"{i}.png")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]
    from tasks.core.params import deep_merge

    params = deep_merge(params, {PAPER: paper})
    params[PAPER]["prepare"].update(image_folder=str(images), model_dir=str(model_dir), max_per_class=20)
    params[PAPER]["train"]["model_dir"] = str(model_dir)
    params[PAPER]["ensemble"]["sizes"] = [1, 2]
    params[PAPER]["evaluate"]["claim_size"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in STAGES:
        run_stage(PAPER, stage, root=tmp_path)
    metrics = json.loads((tmp_path / "results" / PAPER / "metrics.json").read_text())
    assert "lpe_adds_to_snapshots" not in metrics["claims"]  # no snapshot baseline at paper scale
    assert metrics["table"]["lpe_b4_m2"]["nll"]["mean"] > 0
