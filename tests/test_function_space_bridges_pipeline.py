"""function_space_bridges end to end at smoke scale: dvc repro, every claim re-derived from its details,
the gates, a poisoned param, the Prefect flow with MLflow child runs, and the paper-scale image-folder
loader on tiny generated folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "function_space_bridges"
STAGES = ["prepare", "bridge", "posterior", "evaluate"]
CLAIMS = {"bridge_transports", "iterations_help", "resolution_free", "densities_valid", "gp_posterior_matches"}
GATES = {"classifier_accepts_real_b", "classifier_rejects_real_a", "mmd_floor_below_no_transport"}


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
    head = metrics["headline"]
    assert set(head["functions_mmd2"]) >= {"final_16", "final_32", "no_transport", "floor"}
    assert head["euler_maruyama_max_a_dt"] > 2  # the finest grid is stiff: the exact step is needed
    evidence = json.loads((results / "evidence.json").read_text())
    seed = evidence["seeds"][0]
    assert {"16", "32"} <= set(seed["images"]) and {"16", "32"} <= set(seed["functions"])
    for png in ("transported_images.png", "function_samples.png", "gp_posterior.png"):
        assert (results / "plots" / png).stat().st_size > 1000
    meta = json.loads((reproduced / "artifacts" / PAPER / "bridge" / "meta.json").read_text())
    assert meta["seeds"] == [0, 1] and set(meta["experiments"]) == {"functions", "images"}


def test_gate_failure_makes_image_claims_untestable():
    import yaml

    from tasks.function_space_bridges.decide import decide
    from tasks.function_space_bridges.evaluate import Margins
    from tests.conftest import ROOT

    m = Margins.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["evaluate"]["margins"])

    def row(b_accuracy: float, shift: float) -> dict:
        img = lambda fd, acc: {"fd": fd, "domain_accuracy": acc}
        fun = lambda mmd: {"mmd2": mmd, "mass_error": 0.01, "negative_mass": 0.001}
        res = lambda k: {"no_transport": img(400, 0.02), "floor": img(8, b_accuracy),
                         "first_equal_steps": img(80 + shift, 0.8), "final": img(40 + shift * k, 0.9)}
        grid = lambda k: {"no_transport": 0.3, "floor": 0.0, "first": fun(0.03),
                          "first_equal_steps": fun(0.02 + shift / 1e3), "final": fun(0.003 + shift / 1e4 + 0.002 * k)}
        return {"images": {"examples": {}, "16": res(1), "32": res(1.05)},
                "functions": {"grids": [32, 64], "32": grid(0), "64": grid(1)},
                "posterior": {"synthetic": {"mean_error": 0.05 + shift / 1e3, "std_error": 0.06}}}

    claims, gates = decide([row(0.95, s) for s in (0.0, 1.0, 2.0)], m)
    c = {x.name: x for x in claims}
    assert all(g.passed for g in gates)
    assert c["bridge_transports"].verdict is True and c["iterations_help"].verdict is True
    assert c["densities_valid"].verdict is True and c["gp_posterior_matches"].verdict is True
    claims, gates = decide([row(0.5, s) for s in (0.0, 1.0, 2.0)], m)  # the classifier misses real B
    c = {x.name: x for x in claims}
    assert not gates[0].passed and c["bridge_transports"].verdict is None
    assert c["densities_valid"].verdict is True


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(reproduced):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    assert_poisoned_param_keeps_outputs(reproduced, PAPER)


def test_second_repro_does_nothing(reproduced):
    out = dvc(reproduced, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out


def test_prefect_flow_logs_parent_and_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    from flows.function_space_bridges import function_space_bridges
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(function_space_bridges, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    ev = runs[runs["tags.mlflow.runName"] == f"{PAPER}-evaluate"].iloc[0]
    assert ev["metrics.stage_seconds"] > 0 and "metrics.effect_bridge_transports" in runs.columns
    again = function_space_bridges()
    assert not any(s["ran"] for s in again["stages"])


def test_paper_scale_image_folders_run_through_the_same_stages(tmp_path):
    """scales/paper.yaml's image_source 'folders' reads two local folders of images (tiny RGB ones here)."""
    import yaml
    from PIL import Image

    from tasks.core import run_stage
    from tasks.core.params import deep_merge
    from tests.conftest import ROOT

    rng = np.random.default_rng(0)
    for domain, colour in (("a", 0), ("b", 2)):
        folder = tmp_path / "images" / domain / "class0"
        folder.mkdir(parents=True)
        for i in range(12):
            img = rng.integers(0, 60, (20, 20, 3)).astype(np.uint8)
            img[..., colour] += 150
            Image.fromarray(img).save(folder / f"{i}.png")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]
    paper = yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]
    params = deep_merge(params, {PAPER: deep_merge(paper, smoke)})
    params[PAPER]["prepare"].update(domain_a_dir=str(tmp_path / "images" / "a"),
                                    domain_b_dir=str(tmp_path / "images" / "b"), channels=3, image_size=8,
                                    test_image_size=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in STAGES:
        run_stage(PAPER, stage, root=tmp_path, track=False)
    meta = json.loads((tmp_path / "artifacts" / PAPER / "prepare" / "meta.json").read_text())
    assert meta["channels"] == 3 and meta["domain_b_classes"] == [1] and meta["num_classes"] == 2
    metrics = json.loads((tmp_path / "results" / PAPER / "metrics.json").read_text())
    assert set(metrics["claims"]) == CLAIMS


def test_the_global_seed_reaches_the_trained_posterior_control():
    """Another global seed (``python -m tasks seeds``) must train other controls: the posterior jobs seed
    torch with the global seed + the seed, so at global seed 0 the committed runs are unchanged."""
    import torch
    import yaml

    from tasks.core.params import deep_merge
    from tasks.function_space_bridges.posterior import PosteriorJob, PosteriorParams, train_job
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["posterior"]
    smoke = yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER].get("posterior", {})
    p = PosteriorParams.model_validate(deep_merge(params, smoke)).model_copy(update={"steps": 2})
    run = lambda train_seed: train_job(PosteriorJob(0, p.model_dump(), "cpu", train_seed))["state"]
    a, b, c = run(0), run(0), run(1000)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
