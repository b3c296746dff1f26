"""ASE end to end at smoke scale through `dvc repro`; the claims on hand-made numbers; params errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from tasks.core.claims import payload, rederive
from tasks.core.errors import ParamsError
from tests.conftest import ROOT, dvc

PAPER = "early_exit_diffusion"
CLAIMS = {"ase_faster", "ase_quality_kept", "finetuning_needed", "schedule_direction_matters", "ase_beats_fewer_steps"}
QUALITY_CLAIMS = CLAIMS - {"ase_faster"}
GATES = {"base_quality": (">=", 1.0)}


def check_results(repo):
    """metrics.json's claims re-derive from their own details, the gates are the fixed ones, and the
    evidence holds the per-sampler table; the plots exist."""
    res = repo / "results" / PAPER
    m = json.loads((res / "metrics.json").read_text())
    ev = json.loads((res / "evidence.json").read_text())
    assert CLAIMS <= set(m["claims"]) and set(m["claims"]) == set(m["claims_detail"])
    for name, verdict in m["claims"].items():
        assert rederive(m["claims_detail"][name]) == verdict, name
        assert set(ev["claims"][name]["parts"]) == set(ev["samplers"])  # every sampler (long form)
    assert {k: (g["direction"], g["threshold"]) for k, g in m["gates"].items()} == GATES
    if not all(g["passed"] for g in m["gates"].values()):  # a base that cannot draw the data
        for name in QUALITY_CLAIMS:
            assert m["claims"][name] is None and "gate" in m["claims_detail"][name]["reason"]
    assert len(ev["seeds"]) == m["claims_detail"]["ase_faster"]["n"]
    for sampler, variants in ev["summary"].items():
        assert {"full", "naive", "ase", "reversed", "uniform", "full_fewer_steps"} <= set(variants)
        # the schedule saves block evaluations; the full model runs every block at every step
        assert variants["ase"]["blocks_per_image"] < variants["full"]["blocks_per_image"]
        assert variants["naive"]["blocks_per_image"] == variants["ase"]["blocks_per_image"]
        assert variants["full"]["blocks_per_image"] == ev["num_layers"] * ev["samplers"][sampler]
        # the equal-compute baseline: the full model with fewer steps, within half a step of ASE's blocks
        fewer = variants["full_fewer_steps"]["blocks_per_image"]
        assert fewer < variants["full"]["blocks_per_image"]
        assert abs(fewer - variants["ase"]["blocks_per_image"]) <= ev["num_layers"] / 2
        ratios = ev["speed_ratios_per_seed"][sampler]["ase"]
        assert ev["claims"]["ase_faster"]["parts"][sampler]["effect"] == pytest.approx(np.mean(ratios), abs=1e-5)
        assert m["headline"][sampler]["fd_proxy_ase"] == variants["ase"]["fd_proxy"]
    for name in ("tradeoff.png", "samples_full.png", "samples_ase.png"):
        assert (res / "plots" / name).stat().st_size > 0
    assert json.loads((res / "tradeoff.json").read_text())
    return m, ev


@pytest.mark.slow
def test_pipeline_at_smoke_scale_through_dvc_repro(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    m, ev = check_results(smoke_repo)
    assert ev["seeds"] == [0, 1]
    # one base per seed, trained with its own seed; the gate looked at every base
    from diffusers import DiTTransformer2DModel

    pre = smoke_repo / "artifacts" / PAPER / "pretrain"
    b0, b1 = (DiTTransformer2DModel.from_pretrained(pre / f"model_seed{s}") for s in (0, 1))
    assert not all(torch.equal(a, b) for a, b in zip(b0.parameters(), b1.parameters()))
    assert {k.split("/")[0] for k in ev["base_quality"]["per_seed"]} == {"0", "1"}
    assert m["claims"]["ase_faster"] in (True, False)  # two seeds: a confidence interval, a verdict
    again = dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    assert "didn't change" in again.stdout or "up to date" in again.stdout


# ---------------------------------------------------------------------------- claims on hand-made numbers
def _rows(fd: dict, speed: dict, samplers=("ddim", "ddpm"), seeds=(0, 1, 2), noise=0.01, rng_seed=0):
    """Rows as evaluate_seed writes them: per (seed, sampler, variant) an FD-proxy and images/s, each
    scaled by a seed's machine/noise factor (shared by the variants) and a little of its own noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for sampler in samplers:
        for seed in seeds:
            common = 1 + 0.2 * rng.standard_normal()
            for v in fd:
                own = 1 + noise * rng.standard_normal(2)
                rows.append({"seed": seed, "sampler": sampler, "variant": v, "fd_proxy": fd[v][sampler] * common * own[0],
                             "images_per_s": speed[v][sampler] * common * own[1]})
    return rows


def _claims(rows, samplers=("ddim", "ddpm"), gates=()):
    from tasks.early_exit_diffusion.evaluate import compute_claims

    claims = compute_claims(rows, list(samplers), speedup=1.25, quality=1.10, finetuning=1.0, direction=1.0,
                            fewer_steps=1.0, gates=gates)
    metrics, evidence = payload(claims, gates)
    for name, detail in metrics["claims_detail"].items():  # what the pipeline test re-derives
        assert rederive(detail) == metrics["claims"][name]
    # the lean details with their parts (metrics.json keeps the weakest; evidence.json has every part)
    return {"claims": metrics["claims"], "gates": metrics["gates"],
            "claims_detail": {name: {**detail, "parts": evidence["claims"][name].get("parts", {})}
                              for name, detail in metrics["claims_detail"].items()}}


def _same(values: dict) -> dict:
    return {v: {"ddim": x, "ddpm": x} for v, x in values.items()}


GOOD_FD = _same({"full": 10.0, "naive": 30.0, "ase": 10.3, "reversed": 20.0, "full_control": 9.0,
                 "full_fewer_steps": 12.0})
GOOD_SPEED = _same({"full": 100.0, "naive": 140.0, "ase": 140.0, "reversed": 140.0, "full_control": 100.0,
                    "full_fewer_steps": 140.0})


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(smoke_repo):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")  # up to date after the test above
    assert_poisoned_param_keeps_outputs(smoke_repo, PAPER)


def test_claims_follow_the_numbers_for_every_sampler():
    out = _claims(_rows(GOOD_FD, GOOD_SPEED))
    assert out["claims"] == {"ase_faster": True, "ase_quality_kept": True, "finetuning_needed": True,
                             "schedule_direction_matters": True, "ase_quality_kept_vs_equal_steps_full": False,
                             "ase_beats_fewer_steps": True}
    detail = out["claims_detail"]["ase_faster"]
    assert detail["n"] == 3 and detail["margin"] == 1.25 and detail["ci"][0] > 1.25
    assert detail["effect"] == pytest.approx(1.4, abs=0.05)


def test_one_slow_sampler_fails_the_speed_claim():
    speed = {**GOOD_SPEED, "ase": {"ddim": 140.0, "ddpm": 120.0}}  # ddpm: 1.2x < 1.25
    fd = {**GOOD_FD, "ase": {"ddim": 10.3, "ddpm": 12.0}}         # ddpm: 1.2x the full model's FD
    out = _claims(_rows(fd, speed))
    assert out["claims"]["ase_faster"] is False and out["claims"]["ase_quality_kept"] is False
    parts = out["claims_detail"]["ase_faster"]["parts"]
    assert parts["ddim"]["verdict"] is True and parts["ddpm"]["verdict"] is False


def test_ase_must_beat_the_fewer_steps_full_model_on_every_sampler():
    """ASE's FD-proxy over the equal-compute fewer-steps full model's, per seed, CI below 1 on every sampler."""
    from tasks.early_exit_diffusion.evaluate import equal_compute_steps

    assert [equal_compute_steps(b, 6) for b in (105, 61, 210, 102)] == [18, 10, 35, 17]
    assert equal_compute_steps(2, 6) == 1 and equal_compute_steps(210, 12) == 18  # guidance: 2 x 6 per step
    fd = {**GOOD_FD, "full_fewer_steps": {"ddim": 12.0, "ddpm": 10.4}}  # ddpm: ASE 10.3 vs 10.4, noise 1%
    out = _claims(_rows(fd, GOOD_SPEED))
    parts = out["claims_detail"]["ase_beats_fewer_steps"]["parts"]
    assert parts["ddim"]["verdict"] is True and parts["ddpm"]["verdict"] is False
    assert out["claims"]["ase_beats_fewer_steps"] is False
    assert out["claims_detail"]["ase_beats_fewer_steps"]["weakest_part"] == "ddpm"
    worse = {**GOOD_FD, "full_fewer_steps": {"ddim": 9.0, "ddpm": 9.0}}
    assert _claims(_rows(worse, GOOD_SPEED))["claims"]["ase_beats_fewer_steps"] is False


def test_a_mean_past_the_margin_is_not_enough_when_the_seeds_disagree():
    """The old claim compared means; a CI that straddles the margin does not hold."""
    speed = {**GOOD_SPEED, "ase": {"ddim": 140.0, "ddpm": 140.0}}
    out = _claims(_rows(GOOD_FD, speed, noise=0.15, rng_seed=3))
    detail = out["claims_detail"]["ase_faster"]
    assert detail["effect"] > 1.25 and detail["ci"][0] < 1.25
    assert out["claims"]["ase_faster"] is False


def test_a_base_that_draws_noise_makes_the_quality_claims_untestable():
    from tasks.early_exit_diffusion.evaluate import base_quality_gate

    def rows(accs, fds):  # one base per seed: its full model's samples on two samplers
        return [{"seed": seed, "sampler": s, "variant": "full", "label_accuracy": a, "fd_proxy": f}
                for seed, (a, f) in enumerate(zip(accs, fds)) for s in ("ddim", "ddpm")]

    failed, info = base_quality_gate(rows([0.15], [455.0]), floor=9.0, min_accuracy=0.85, max_fd_ratio=3.0)
    assert failed.name == "base_quality" and not failed.passed
    assert info["worst_fd_ratio"] == pytest.approx(455 / 9) and info["worst_label_accuracy"] == 0.15
    passed, _ = base_quality_gate(rows([0.9, 0.95], [20.0, 18.0]), floor=9.0, min_accuracy=0.85, max_fd_ratio=3.0)
    assert passed.passed and passed.value == pytest.approx(min(0.9 / 0.85, 3.0 / (20 / 9)))
    # one base of three that does not draw the data (FD 40 > 3 x 9) fails the gate for every claim
    one_bad, info = base_quality_gate(rows([0.9, 0.9, 0.9], [20.0, 40.0, 18.0]), floor=9.0, min_accuracy=0.85,
                                      max_fd_ratio=3.0)
    assert not one_bad.passed and set(info["per_seed"]) == {"0/ddim", "0/ddpm", "1/ddim", "1/ddpm", "2/ddim",
                                                            "2/ddpm"}
    low_accuracy, _ = base_quality_gate(rows([0.9, 0.8], [20.0, 20.0]), floor=9.0, min_accuracy=0.85,
                                        max_fd_ratio=3.0)
    assert not low_accuracy.passed

    out = _claims(_rows(GOOD_FD, GOOD_SPEED), gates=[failed])
    assert out["claims"]["ase_faster"] is True  # speed needs no quality gate
    for name in QUALITY_CLAIMS | {"ase_quality_kept_vs_equal_steps_full"}:  # ase_beats_fewer_steps too
        assert out["claims"][name] is None
        assert "base_quality" in out["claims_detail"][name]["reason"]
    assert set(out["gates"]) == set(GATES)


def test_a_fine_tuning_seed_without_its_own_base_is_a_clear_error(tmp_path):
    from tasks.core import io
    from tasks.core.errors import MissingInputError
    from tasks.early_exit_diffusion.common import base_dir

    io.write_json(tmp_path / "meta.json", {"init": "scratch", "num_layers": 2, "parameters": 10, "seeds": [0, 1],
                                           "final_loss": [0.1, 0.1]})
    assert base_dir(tmp_path, 1) == tmp_path / "model_seed1"
    with pytest.raises(MissingInputError, match=r"early_exit_diffusion.pretrain.seeds"):
        base_dir(tmp_path, 2)


def test_one_seed_gives_no_verdict_and_missing_variants_give_no_claim():
    fd = {v: GOOD_FD[v] for v in ("full", "naive", "ase")}
    out = _claims(_rows(fd, GOOD_SPEED, seeds=(0,)))
    assert set(out["claims"]) == {"ase_faster", "ase_quality_kept", "finetuning_needed"}
    assert all(v is None for v in out["claims"].values())


# ----------------------------------------------------------------------------------------- params, errors
@pytest.mark.parametrize("section,key,value,needle", [
    ("finetune", "schedule", [6, 6, 5.5, 5, 4, 4, 3, 3, 3, 3], "integer block counts"),
    ("finetune", "schedule", [6, 6, "5", 5, 4, 4, 3, 3, 3, 3], "integer block counts"),
    ("finetune", "variants", ["reversed"], "must include 'ase'"),
    ("finetune", "variants", ["ase", "shallow"], "variants"),
    ("finetune", "seeds", [], "at least 1"),
    ("evaluate", "grid_sampler", "ddpm", "is not one of samplers"),
    ("evaluate", "samplers", {"euler": 10}, "samplers"),
    ("evaluate", "base_label_accuracy_min", 1.5, "base_label_accuracy_min"),
    ("pretrain", "heads", 5, "divisible by heads"),
    ("pretrain", "seeds", [0, 0], "must not repeat"),
    ("prepare", "source", "latents", "needs 'latents_path'"),
])
def test_bad_params_name_the_problem(section, key, value, needle):
    from tasks.core.params import validate_section
    from tasks.core.registry import get_stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER][section]
    params = {**params, key: value}
    if section == "evaluate" and key == "grid_sampler":
        params["samplers"] = {"ddim": 5}
    with pytest.raises(ParamsError, match=needle):
        validate_section(PAPER, section, get_stage(PAPER, section).params, params, "params.yaml")


@pytest.mark.parametrize("section", ["prepare", "pretrain", "finetune", "evaluate"])
def test_every_param_comes_from_params_yaml(section):
    """No defaults: leaving a key out of params.yaml is an error that names it."""
    from tasks.core.params import validate_section
    from tasks.core.registry import get_stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER][section]
    model = get_stage(PAPER, section).params
    assert all(f.is_required() for f in model.model_fields.values())
    assert set(params) == set(model.model_fields)
    for key in params:
        with pytest.raises(ParamsError, match=f"'{PAPER}.{section}.{key}' is missing"):
            validate_section(PAPER, section, model, {k: v for k, v in params.items() if k != key}, "params.yaml")


def test_schedule_deeper_than_the_model_fails_before_any_finetuning():
    """The schedule is validated against the pretrained model's depth with a clear message."""
    import torch

    from models.early_exit_diffusion import tiny_dit
    from tasks.early_exit_diffusion.common import variant_schedule

    model = tiny_dit(num_layers=3, hidden=32, heads=2, sample_size=8, patch_size=2)
    with pytest.raises(ValueError, match="has only 3"):
        variant_schedule("ase", model, [6, 6, 5, 5, 4, 4, 3, 3, 3, 3])
    assert variant_schedule("uniform", model, [3, 3, 3, 3, 2, 2, 1, 1, 1, 1]).blocks == (2,) * 10
    assert variant_schedule("reversed", model, [3, 3, 3, 3, 2, 2, 1, 1, 1, 1]).blocks[0] == 1
    assert torch.is_tensor(variant_schedule("full", model, [3] * 10).blocks_at(5))
