"""The claims layer: a known effect is found, a null effect is not, a failed gate gives null, and the
bootstrap interval covers the truth about as often as it says."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.core.claims import all_of, gate, payload, per_example, per_seed, rederive, t_interval


def test_known_effect_is_found_and_sign_convention_holds():
    rng = np.random.default_rng(0)
    diffs = 0.5 + 0.05 * rng.standard_normal(5)
    c = per_seed("a_beats_b", diffs, margin=0.1, direction=">")
    assert c.verdict is True and c.ci[0] > 0.1 and c.n == 5
    # the same numbers claimed the other way round do not hold
    assert per_seed("b_beats_a", -diffs, margin=-0.1, direction=">").verdict is False
    assert per_seed("a_below", -diffs, margin=-0.1, direction="<").verdict is True


def test_null_effect_gives_false_not_true():
    rng = np.random.default_rng(1)
    c = per_seed("no_effect", 0.1 * rng.standard_normal(5), margin=0.0, direction=">")
    assert c.verdict is False and c.ci[0] < 0 < c.ci[1]


def test_effect_inside_the_margin_is_false():
    c = per_seed("small", [0.05, 0.06, 0.055, 0.052], margin=0.1, direction=">")
    assert c.ci[0] > 0 and c.verdict is False


def test_failed_gate_gives_null_with_reason():
    g = gate("base_quality", 0.15, 0.85, ">=", "label accuracy of the base model's samples")
    c = per_seed("quality_kept", [1.0, 1.1, 0.9], margin=1.1, direction="<", gates=[g])
    assert c.verdict is None and c.gate == "base_quality"
    assert "0.15 is not >= 0.85" in c.reason
    ok = gate("base_quality", 0.9, 0.85)
    assert per_seed("x", [2.0, 2.1, 1.9], margin=1.0, gates=[ok]).verdict is True


def test_one_seed_is_untestable_for_a_t_interval():
    c = per_seed("x", [3.0], margin=0.0)
    assert c.verdict is None and "at least 2" in c.reason


def test_t_interval_matches_textbook():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)


def test_bootstrap_ci_covers_the_true_mean_at_about_95_percent():
    rng = np.random.default_rng(2)
    hits, trials = 0, 200
    for t in range(trials):
        data = [rng.normal(0.3, 1.0, size=200)]
        c = per_example("x", data, margin=0.0, n_boot=400, rng_seed=t)
        hits += c.ci[0] <= 0.3 <= c.ci[1]
    assert 0.89 <= hits / trials <= 0.99


def test_per_example_finds_a_paired_gain_and_its_detail_rederives():
    rng = np.random.default_rng(3)
    diffs = [0.2 + rng.standard_normal(300) for _ in range(3)]
    c = per_example("gain", diffs, margin=0.0)
    assert c.verdict is True
    out, evidence = payload([c, per_seed("tie", [0.0, 0.1, -0.1], margin=0.0)],
                            [gate("g", 1.0, 0.5, description="a precondition")])
    assert out["claims"] == {"gain": True, "tie": False}
    assert out["gates"]["g"] == {"value": 1.0, "threshold": 0.5, "direction": ">=", "passed": True}
    assert evidence["gates"]["g"]["description"] == "a precondition"
    assert evidence["claims"]["gain"]["method"] == "bootstrap over seeds and examples"
    for name, detail in out["claims_detail"].items():
        assert rederive(detail) == out["claims"][name]


def test_all_of_needs_every_part():
    good = per_seed("a", [1.0, 1.1, 0.9], margin=0.0)
    bad = per_seed("b", [0.1, -0.1, 0.0], margin=0.0)
    untestable = per_seed("c", [1.0, 1.1], margin=0.0, gates=[gate("g", 0.0, 1.0)])
    assert all_of("all", {"a": good, "a2": good}).verdict is True
    both = all_of("all", {"a": good, "b": bad})
    assert both.verdict is False and both.effect == bad.effect
    mixed = all_of("mixed", {"a": good, "c": untestable})
    assert mixed.verdict is None and "part 'c'" in mixed.reason
    metrics, evidence = payload([both, mixed])
    detail = metrics["claims_detail"]["all"]
    assert detail["weakest_part"] == "b" and rederive(detail) is False  # the weakest part decides
    assert rederive(metrics["claims_detail"]["mixed"]) is None
    assert set(evidence["claims"]["all"]["parts"]) == {"a", "b"}


def test_all_of_verdict_follows_from_the_weakest_part_alone():
    rng = np.random.default_rng(4)
    for _ in range(50):
        parts = {f"p{i}": per_seed(f"p{i}", rng.normal(rng.normal(0, 1), 0.5, 3), margin=0.2,
                                   direction=rng.choice([">", "<"])) for i in range(3)}
        claim = all_of("x", parts)
        assert rederive(payload([claim])[0]["claims_detail"]["x"]) == claim.verdict
