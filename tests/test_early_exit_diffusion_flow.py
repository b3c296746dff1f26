"""ASE end to end at smoke scale: through `dvc repro` and through the Prefect flow; params errors."""
from __future__ import annotations

import json

import pytest

from tasks.core.errors import ParamsError
from tests.conftest import dvc, make_clone

PAPER = "early_exit_diffusion"
CLAIMS = {"ase_faster", "ase_quality_kept", "finetuning_needed", "schedule_direction_matters"}


def _check_results(repo):
    res = repo / "results" / PAPER
    m = json.loads((res / "metrics.json").read_text())
    assert CLAIMS <= set(m["claims"]) and all(isinstance(v, bool) for v in m["claims"].values())
    for sampler, variants in m["summary"].items():
        assert {"full", "naive", "ase", "reversed"} <= set(variants)
        # the schedule saves block evaluations; the full model runs every block at every step
        assert variants["ase"]["blocks_per_image"] < variants["full"]["blocks_per_image"]
        assert variants["naive"]["blocks_per_image"] == variants["ase"]["blocks_per_image"]
        assert variants["full"]["blocks_per_image"] == m["num_layers"] * m["samplers"][sampler]
    # claims are recomputed from the numbers in the same file
    from tasks.early_exit_diffusion import compute_claims

    ev = m["samplers"]
    assert compute_claims(m["summary"], list(ev), 1.25, 1.10) == {k: m["claims"][k] for k in m["claims"]}
    for name in ("tradeoff.png", "samples_full.png", "samples_ase.png"):
        assert (res / "plots" / name).stat().st_size > 0
    assert json.loads((res / "tradeoff.json").read_text())
    return m


@pytest.mark.slow
def test_pipeline_at_smoke_scale_through_dvc_repro(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    _check_results(smoke_repo)
    again = dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    assert "didn't change" in again.stdout or "up to date" in again.stdout


@pytest.mark.slow
def test_pipeline_at_smoke_scale_through_the_prefect_flow(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    repo = make_clone(tmp_path / "repo", scale="smoke", papers=[PAPER])
    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    monkeypatch.chdir(repo)
    from flows.early_exit_diffusion import early_exit_diffusion

    out = early_exit_diffusion(scale="smoke")
    assert out["stages_run"] == 4
    m = _check_results(repo)
    assert m["seeds"] == [0]


@pytest.mark.parametrize("section,key,value,needle", [
    ("finetune", "schedule", [6, 6, 5.5, 5, 4, 4, 3, 3, 3, 3], "integer block counts"),
    ("finetune", "schedule", [6, 6, "5", 5, 4, 4, 3, 3, 3, 3], "integer block counts"),
    ("finetune", "variants", ["reversed"], "must include 'ase'"),
    ("finetune", "variants", ["ase", "shallow"], "variants"),
    ("finetune", "seeds", [], "at least 1"),
    ("evaluate", "grid_sampler", "ddpm", "is not one of samplers"),
    ("evaluate", "samplers", {"euler": 10}, "samplers"),
    ("pretrain", "heads", 5, "divisible by heads"),
    ("prepare", "source", "latents", "needs 'latents_path'"),
])
def test_bad_params_name_the_problem(section, key, value, needle):
    import yaml

    from tasks.core.params import validate_section
    from tasks.core.registry import get_stage
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER][section]
    params = {**params, key: value}
    if section == "evaluate" and key == "grid_sampler":
        params["samplers"] = {"ddim": 5}
    with pytest.raises(ParamsError, match=needle):
        validate_section(PAPER, section, get_stage(PAPER, section).params, params, "params.yaml")


def test_schedule_deeper_than_the_model_fails_before_any_finetuning(tmp_path):
    """The schedule is validated against the pretrained model's depth with a clear message."""
    import torch

    from models.early_exit_diffusion import tiny_dit
    from tasks.early_exit_diffusion import variant_schedule

    model = tiny_dit(num_layers=3, hidden=32, heads=2, sample_size=8, patch_size=2)
    with pytest.raises(ValueError, match="has only 3"):
        variant_schedule("ase", model, [6, 6, 5, 5, 4, 4, 3, 3, 3, 3])
    assert variant_schedule("uniform", model, [3, 3, 3, 3, 2, 2, 1, 1, 1, 1]).blocks == (2,) * 10
    assert variant_schedule("reversed", model, [3, 3, 3, 3, 2, 2, 1, 1, 1, 1]).blocks[0] == 1
    assert torch.is_tensor(variant_schedule("full", model, [3] * 10).blocks_at(5))


def test_claims_follow_the_numbers_for_every_sampler():
    from tasks.early_exit_diffusion import compute_claims

    def row(fd, speed):
        return {"fd_proxy": fd, "speedup_vs_full": speed}

    good = {"full": row(10.0, 1.0), "naive": row(30.0, 1.4), "ase": row(10.5, 1.4), "reversed": row(20.0, 1.4),
            "full_control": row(9.0, 1.0)}
    summary = {"ddim": dict(good), "ddpm": dict(good)}
    c = compute_claims(summary, ["ddim", "ddpm"], 1.25, 1.10)
    assert c == {"ase_faster": True, "ase_quality_kept": True, "finetuning_needed": True,
                 "schedule_direction_matters": True, "ase_quality_kept_vs_equal_steps_full": False}
    summary["ddpm"] = {**good, "ase": row(12.0, 1.2)}  # one sampler fails both speed and quality
    c = compute_claims(summary, ["ddim", "ddpm"], 1.25, 1.10)
    assert not c["ase_faster"] and not c["ase_quality_kept"]
