"""modular_lora's claims function on hand-made outcomes: paired per-sample effects, CIs against the
margins of params.yaml, gates, and the joint claims over the safety objectives."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.core.claims import gate, payload, rederive
from tasks.modular_lora.claims import Outcomes, modular_lora_claims
from tasks.modular_lora.evaluate import EvaluateParams

N = 64  # concept samples per model and seed


def params() -> EvaluateParams:
    import yaml

    from tests.conftest import ROOT

    return EvaluateParams(**yaml.safe_load((ROOT / "params.yaml").read_text())["modular_lora"]["evaluate"])


def outcome(harmful: float, fd: float = 50.0, kept: float = 0.9, to_concept: float = 0.0, task: float = 0.8,
            seed: int = 0) -> Outcomes:
    """Outcomes whose 0/1 arrays have exactly the given rates (the ones first, shuffled by seed)."""
    rng = np.random.default_rng(seed)

    def flags(rate, n):
        a = np.zeros(n)
        a[: int(round(rate * n))] = 1
        return rng.permutation(a)

    return Outcomes({"harmful": harmful, "task_fd": fd}, flags(harmful, N),
                    {"plain": flags(to_concept, 72), "new": flags(to_concept, 72)}, flags(kept, 72), flags(task, 72))


def paper_like(seeds=(0, 1, 2), modular_harmful=0.0):
    """W0 draws the concept half the time, safety erases it, both standard arms bring it back, Modular not."""
    base = outcome(0.5, fd=80.0)
    models = {"safe": {}, "full": {}, "lora_on_safe": {}, "modular": {}}
    for s in seeds:
        models["safe"][s] = outcome(0.0, fd=100.0, kept=0.88, seed=s)
        models["full"][s] = outcome(0.5, fd=30.0, task=0.9, seed=s + 10)
        models["lora_on_safe"][s] = outcome(0.45, fd=40.0, task=0.85, seed=s + 20)
        models["modular"][s] = outcome(modular_harmful, fd=32.0, task=0.95, seed=s + 30)
    return base, {"esd": models, "sdd": models}


def test_the_papers_pattern_gives_every_claim():
    base, runs = paper_like()
    claims = {c.name: c for c in modular_lora_claims(base, runs, params(), [gate("w0_quality", 0.9, 0.8)])}
    for name in ("safety_works", "finetuning_backfires", "modular_lora_keeps_safety", "modular_lora_learns_task"):
        assert claims[name].verdict is True, claims[name]
        assert claims[f"{name}_esd"].verdict is True and claims[f"{name}_sdd"].verdict is True
    backfire = claims["finetuning_backfires_esd"].parts["lora_on_safe_rises"]
    assert backfire.effect == pytest.approx(29 / N) and backfire.ci[0] > 0.1 and backfire.n == 3
    # the detail re-derives every verdict
    data, evidence = payload(claims.values())
    assert all(rederive(data["claims_detail"][k]) == v for k, v in data["claims"].items())
    assert data["claims_detail"]["finetuning_backfires"]["weakest_part"] in ("esd", "sdd")
    assert set(evidence["claims"]["safety_works_esd"]["parts"]) == {"erased", "others_kept"}


def test_a_modular_rise_within_noise_of_the_margin_is_not_claimed():
    """Modular's harmful rate at the margin (0.05 over a safe model at 0): the mean may sit below it, the
    CI does not, so the claim is false, decided by the interval and not by the mean."""
    base, runs = paper_like(modular_harmful=3 / N)  # 0.047 < 0.05
    claims = {c.name: c for c in modular_lora_claims(base, runs, params(), [])}
    near = claims["modular_lora_keeps_safety_esd"].parts["near_safe"]
    assert near.effect < params().modular_margin < near.ci[1]
    assert claims["modular_lora_keeps_safety"].verdict is False


def test_a_failed_gate_makes_every_claim_untestable():
    base, runs = paper_like()
    claims = modular_lora_claims(base, runs, params(), [gate("w0_quality", 0.5, 0.8)])
    assert all(c.verdict is None and "w0_quality" in c.reason for c in claims)


def test_one_seed_leaves_the_fd_claim_untestable_but_not_the_per_sample_ones():
    base, runs = paper_like(seeds=(0,))
    claims = {c.name: c for c in modular_lora_claims(base, runs, params(), [])}
    assert claims["safety_works_esd"].verdict is True
    fd = claims["modular_lora_learns_task_esd"].parts["fd_vs_full"]
    assert fd.verdict is None and "n = 1" in fd.reason


def test_pipeline_outcomes_without_digit_accuracies_use_the_same_function():
    """The paper scale has no per-digit accuracies: the parts that need them are left out, nothing else."""
    base, runs = paper_like()
    strip = lambda o: Outcomes(o.metrics, o.harmful, {"benign": o.to_concept["plain"]}, None, None)  # noqa: E731
    runs = {obj: {m: {s: strip(o) for s, o in by_seed.items()} for m, by_seed in models.items()}
            for obj, models in runs.items()}
    claims = {c.name: c for c in modular_lora_claims(strip(base), runs, params(), [])}
    assert set(claims["safety_works_esd"].parts) == {"erased"}
    assert set(claims["modular_lora_learns_task_esd"].parts) == {"fd_vs_full", "fd_vs_lora_on_safe"}
    assert "full_no_collapse_benign" in claims["finetuning_backfires_esd"].parts
    assert claims["finetuning_backfires"].verdict is True


def test_reemergence_fraction_on_hand_made_rates():
    """(arm − safe) / (W0_plus_ft − safe): full FT at 0.5 against a control at 0.5 over a safe model at 0 is
    1 (everything fine-tuning alone keeps comes back), Modular at 0.1 is 0.2; the CI holds the estimate."""
    from tasks.modular_lora.claims import reemergence_fractions

    base, runs = paper_like(modular_harmful=0.1)
    models = runs["esd"]
    models["W0_plus_ft"] = {s: outcome(0.5, seed=s + 40) for s in models["safe"]}
    frac = reemergence_fractions({"esd": models}, n_boot=300)["esd"]
    assert frac["full"]["estimate"] == pytest.approx(1.0, abs=0.02)
    assert frac["modular"]["estimate"] == pytest.approx(round(0.1 * N) / N / (32 / N), abs=0.02)
    assert frac["lora_on_safe"]["estimate"] == pytest.approx(29 / 32, abs=0.02)
    for v in frac.values():
        assert v["ci"][0] <= v["estimate"] <= v["ci"][1] and v["n"] == 3 and len(v["per_seed"]) == 3
    # a control that keeps nothing of the concept over the safe model leaves the fraction undefined
    models["W0_plus_ft"] = {s: outcome(0.0, seed=s) for s in models["safe"]}
    assert reemergence_fractions({"esd": models}, n_boot=50)["esd"]["full"]["estimate"] is None
    # no control, no fraction
    del models["W0_plus_ft"]
    assert reemergence_fractions({"esd": models}, n_boot=50) == {}


def test_harmful_rate_rises_by_the_margin_only_when_the_ci_clears_it():
    """Backfire at exactly the margin on the mean (0.5 − 0.4 = 0.1 rise, per paired sample) is not established."""
    base, runs = paper_like()
    for s in runs["esd"]["safe"]:
        runs["esd"]["full"][s] = outcome(0.1, seed=s + 50)
    claims = {c.name: c for c in modular_lora_claims(base, {"esd": runs["esd"]}, params(), [])}
    part = claims["finetuning_backfires_esd"].parts["full_rises"]
    assert part.effect == pytest.approx(round(0.1 * N) / N) and part.ci[0] < params().backfire_margin
    assert part.verdict is False and claims["finetuning_backfires"].verdict is False
