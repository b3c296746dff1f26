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


CLAIMS = {"ambiguity_grows_as_bits_drop", "lpe_error_le_rtn_low_bits", "lpe_nll_below_rtn",
          "lpe_adds_to_snapshots", "lpe_gain_grows_with_width", "lpe_adds_to_swag", "lpe_adds_to_ivon",
          "lpe_comparable_to_bma"}


def test_dvc_repro_writes_metrics_with_claims(reproduced):
    from tasks.core.claims import rederive

    results = reproduced / "results" / PAPER
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["claims"]) == CLAIMS  # the Jensen pair (ambiguity > 0, beats members) is gone
    assert set(metrics) == {"claims", "claims_detail", "gates", "headline"}
    # every verdict follows from the numbers stored beside it (effect, CI, margin, gate)
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
    gates = metrics["gates"]
    assert set(gates) == {"fp32_accuracy", "width_sweep", "swag_diversity", "ivon_diversity"}
    assert set(metrics["claims_detail"]["lpe_comparable_to_bma"]) >= {"effect", "ci", "margin"}
    assert gates["width_sweep"] == {"value": 3.0, "threshold": 3.0, "direction": ">=", "passed": True}
    if not gates["fp32_accuracy"]["passed"]:  # a gate that fails makes every claim it guards untestable
        assert all(v is None for v in metrics["claims"].values())
        assert "fp32_accuracy" in metrics["claims_detail"]["lpe_nll_below_rtn"]["reason"]
    assert metrics["claims_detail"]["lpe_nll_below_rtn"]["weakest_part"] in ("int3", "int4")
    assert set(metrics["headline"]["lpe_gain_by_width"]) == {"8", "16", "32"}
    evidence = json.loads((results / "evidence.json").read_text())
    assert set(evidence["claims"]["lpe_nll_below_rtn"]["parts"]) == {"int3", "int4"}
    assert set(evidence["claims"]["lpe_comparable_to_bma"]["parts"]) == {"swag", "ivon"}
    table = evidence["table"]  # equal memory: 8 INT-4 members per FP32 posterior sample
    for bma in ("swag", "ivon"):
        assert table[f"{bma}_lpe"]["members"]["mean"] == 8 * table[bma]["members"]["mean"] == 16
        assert abs(table[f"{bma}_lpe"]["memory"]["mean"] - table[bma]["memory"]["mean"]) < 0.5
    assert evidence["gates"]["width_sweep"]["description"] == "widths trained in the sweep"
    assert len(evidence["width_slopes"]) == 2 and "table" in evidence
    assert len(evidence["width_evidence_only"]["int3"]["slopes"]) == 2
    for png in ("nll_vs_size.png", "nll_vs_memory.png", "lpe_gain_vs_width.png"):
        assert (results / "plots" / png).stat().st_size > 1000
    shown = dvc(reproduced, "metrics", "show", "--json").stdout
    assert "lpe_nll_below_rtn" in shown and '"table"' not in shown  # evidence.json is not a metrics file


def test_claims_on_hand_made_predictions():
    """decide() on two seeds of hand-made probabilities: LPE beats RTN by construction."""
    import numpy as np

    import yaml

    from tasks.lowprec_ensemble.common import EnsembleMeta
    from tasks.lowprec_ensemble.evaluate import EvaluateParams, decide
    from tests.conftest import ROOT

    p = EvaluateParams.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["evaluate"])
    rng = np.random.default_rng(0)
    n, y = 400, rng.integers(0, 10, 400)
    onehot = lambda conf: np.where(np.eye(10)[y] > 0, conf, (1 - conf) / 9)
    arrays, rows = {}, {"fp32": [{"err": 0.02}] * 2}
    for seed in range(2):
        a = {"labels": y, "rtn_b3": onehot(rng.uniform(0.3, 0.5, (n, 1))), "rtn_b4": onehot(rng.uniform(0.3, 0.5, (n, 1)))}
        for b in (3, 4):
            a[f"lpe_b{b}"] = np.stack([onehot(rng.uniform(0.7, 0.9, (n, 1))) for _ in range(10)])
        arrays[seed] = a
    for b, amb in ((3, [0.3, 0.31]), (4, [0.1, 0.12])):
        rows[f"lpe_b{b}_m10"] = [{"amb": v} for v in amb]
    meta = EnsembleMeta(seeds=[0, 1], bits=[3, 4], sizes=[10], quantized_params=1, fp_params=1,
                        snapshot_lpe_bits=4, snapshot_lpe_members=1, bma_lpe_bits=4, widths=[], width_bits=4,
                        width_evidence_bits=[])
    for a in arrays.values():  # SWAG: LPE on top helps; IVON: a point mass (all samples equal)
        a["swag"] = np.stack([onehot(rng.uniform(0.5, 0.6, (n, 1))) for _ in range(2)])
        a["swag_lpe"] = np.stack([onehot(rng.uniform(0.8, 0.9, (n, 1))) for _ in range(16)])
        a["ivon"], a["ivon_lpe"] = np.stack([onehot(0.95)] * 2), np.stack([onehot(0.95)] * 16)
    rows["swag"], rows["ivon"] = [{"amb": 0.01}] * 2, [{"amb": 0.0}] * 2
    claims, gates = decide(arrays, rows, meta, p)
    claims = {c.name: c for c in claims}
    assert claims["lpe_adds_to_swag"].verdict is True and claims["lpe_adds_to_swag"].effect < 0
    assert [g.passed for g in gates if g.name.endswith("diversity")] == [True, False]
    assert claims["lpe_adds_to_ivon"].verdict is None and "ivon_diversity" in claims["lpe_adds_to_ivon"].reason
    # LPE INT-4 (confidence 0.7-0.9) is far better than SWAG (0.5-0.6): comparable holds for SWAG
    assert claims["lpe_comparable_to_bma"].parts["swag"].verdict is True
    assert claims["lpe_comparable_to_bma"].verdict is None  # its IVON part is gated
    assert claims["lpe_nll_below_rtn"].verdict is True and claims["lpe_nll_below_rtn"].effect < 0
    assert claims["ambiguity_grows_as_bits_drop"].verdict is True
    assert claims["lpe_error_le_rtn_low_bits"].verdict is False  # argmax is right for both: no difference
    assert claims["lpe_gain_grows_with_width"].verdict is None  # gate: no width sweep


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(reproduced):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    assert_poisoned_param_keeps_outputs(reproduced, PAPER)


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
    assert "metrics.effect_lpe_nll_below_rtn" in runs.columns
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
    assert metrics["claims"]["lpe_gain_grows_with_width"] is None  # no width sweep of a pretrained ViT
    assert metrics["gates"]["width_sweep"]["passed"] is False
    evidence = json.loads((tmp_path / "results" / PAPER / "evidence.json").read_text())
    assert evidence["table"]["lpe_b4_m2"]["nll"]["mean"] > 0
