"""symmetry_generators end to end at smoke scale: dvc repro, every claim re-derived from its details,
the gates, a poisoned param, the Prefect flow with MLflow child runs, and the paper-scale loader on
tiny local files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "symmetry_generators"
STAGES = ["prepare", "learn_symmetry", "augment", "image_symmetry", "evaluate"]
CLAIMS = {"validity_separates", "recovers_translations", "recovers_boost", "generators_distinct",
          "augmentation_helps_low_data", "image_generators_found"}
GATES = {"known_symmetries_near_floor", "random_fields_above_floor", "known_augmentation_helps",
         "image_score_separates"}


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
        assert metrics["claims_detail"][name]["n"] == 2  # two smoke seeds
    assert set(metrics["gates"]) == GATES
    gates = metrics["gates"]
    # translations are exact symmetries of the score; random fields are far from the floor
    assert gates["known_symmetries_near_floor"]["passed"] is True
    assert gates["random_fields_above_floor"]["passed"] is True
    assert metrics["headline"]["gap_to_floor"]["x_translation"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["claims_detail"]["recovers_translations"]["weakest_part"] in ("x_translation",
                                                                                  "t_translation")
    evidence = json.loads((results / "evidence.json").read_text())
    assert len(evidence["seeds"]) == 2 and "table" in evidence["seeds"][0]
    for png in ("validity_vs_step.png", "generator_fields.png", "nmse_by_method.png",
                "digits_validity_accuracy.png", "digits_generator_fields.png"):
        assert (results / "plots" / png).stat().st_size > 1000
    assert set(metrics["headline"]["rollout_nmse"]) == {"none", "known", "learned"}
    assert len(evidence["augmentation"]["runs"]) == 6  # two seeds x three methods
    nmse = json.loads((reproduced / "artifacts" / PAPER / "augment" / "nmse.json").read_text())
    assert all(len(r["nmse"]) == 2 and np.isfinite(r["nmse"]).all() for r in nmse["runs"])  # 2 test trajectories
    digits = evidence["digits"]["runs"]
    assert len(digits) == 2 and set(digits[0]["accuracy"]) == {"none", "affine", "learned"}
    assert {"rotation", "scaling", "translate_x", "learned0", "random0"} <= set(digits[0]["validity"])
    drift = json.loads((reproduced / "artifacts" / PAPER / "prepare" / "conservation.json").read_text())
    assert drift["mass"] < 1e-5 and drift["energy"] < 1e-4


def test_gate_failure_makes_recovery_claims_untestable():
    import yaml

    from tasks.symmetry_generators.evaluate import EvaluateParams, decide
    from tests.conftest import ROOT

    p = EvaluateParams.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["evaluate"])
    row = lambda known, rand: {"gap": {"x_translation": 0.0, "t_translation": 0.0, "galilean_boost": known,
                                       "random0": rand, "random1": rand},
                               "recovery": {"x_translation": 0.95, "t_translation": 0.9, "galilean_boost": 0.5},
                               "max_pair_corr": 0.01}
    claims, gates = decide([row(0.1, 4.0), row(0.12, 4.2), row(0.08, 3.9)], p)
    c = {x.name: x for x in claims}
    assert c["validity_separates"].verdict is True and c["recovers_translations"].verdict is True
    assert c["recovers_boost"].verdict is False and c["generators_distinct"].verdict is True
    claims, gates = decide([row(1.0, 4.0), row(1.2, 4.2)], p)  # the boost is not at the floor
    c = {x.name: x for x in claims}
    assert not gates[0].passed and c["recovers_translations"].verdict is None
    assert "known_symmetries_near_floor" in c["recovers_boost"].reason


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(reproduced):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    assert_poisoned_param_keeps_outputs(reproduced, PAPER)


def test_second_repro_does_nothing(reproduced):
    out = dvc(reproduced, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out


def test_prefect_flow_logs_parent_and_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    from flows.symmetry_generators import symmetry_generators
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(symmetry_generators, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    learn = runs[runs["tags.mlflow.runName"] == f"{PAPER}-learn_symmetry"].iloc[0]
    assert learn["params.steps"] == "4" and learn["metrics.stage_seconds"] > 0
    assert "metrics.effect_validity_separates" in runs.columns
    again = symmetry_generators()
    assert not any(s["ran"] for s in again["stages"])


def test_paper_scale_loader_on_tiny_local_files(tmp_path):
    """scales/paper.yaml's source 'local' reads data_dir/{train,test}.npz through the same stages."""
    import yaml

    from models.symmetry_generators.kdv import lpsda_initial_conditions, solve_kdv
    from tasks.core import run_stage
    from tasks.core.params import deep_merge
    from tests.conftest import ROOT

    data_dir = tmp_path / "kdv"
    data_dir.mkdir()
    nx, length = 32, 16.0
    x = np.arange(nx) * length / nx
    for split, n in (("train", 2), ("test", 2)):
        u0 = lpsda_initial_conditions(np.random.default_rng(len(split)), n, nx, length)
        t, u = solve_kdv(u0, length, 0.01, 4.0, 0.25)
        np.savez(data_dir / f"{split}.npz", u=u, t=t, x=x)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]
    paper = yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]
    params = deep_merge(params, {PAPER: deep_merge(paper, smoke)})
    params[PAPER]["prepare"].update(source="local", data_dir=str(data_dir))
    from PIL import Image  # CIFAR-10 as an image folder: two classes of tiny RGB PNGs

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "cifar" / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "cifar" / label / f"{i}.png")
    params[PAPER]["image_symmetry"].update(data_dir=str(tmp_path / "cifar"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in STAGES:
        run_stage(PAPER, stage, root=tmp_path, track=False)
    meta = json.loads((tmp_path / "artifacts" / PAPER / "prepare" / "meta.json").read_text())
    assert meta["source"] == "local" and meta["nx"] == nx and meta["length"] == length
    assert meta["nt"] == 17 and meta["dt"] == 0.25
    metrics = json.loads((tmp_path / "results" / PAPER / "metrics.json").read_text())
    assert set(metrics["claims"]) == CLAIMS
    images = json.loads((tmp_path / "artifacts" / PAPER / "image_symmetry" / "results.json").read_text())
    assert images["size"] == 32 and len(images["runs"]) == 2   # the paper's 32 x 32 images, two smoke seeds


def test_the_global_seed_reaches_the_image_track():
    """Another global seed (``python -m tasks seeds``) must draw other splits and train other nets: each
    image job seeds with the global seed + the seed, so at global seed 0 the committed runs are unchanged."""
    import torch
    import yaml

    from tasks.core.params import deep_merge
    from tasks.symmetry_generators.image_symmetry import ImageJob, ImageSymmetryParams, image_seed
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["image_symmetry"]
    smoke = yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]["image_symmetry"]
    p = ImageSymmetryParams.model_validate(deep_merge(params, smoke))
    run = lambda train_seed: image_seed(ImageJob(0, "cpu", p.model_dump(), train_seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1000)
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]) and a["validity"] == b["validity"]
    assert not all(torch.equal(a["state"][k], c["state"][k]) for k in a["state"])
    assert a["seed"] == c["seed"] == 0
