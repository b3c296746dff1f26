"""bo_fusion's claims on hand-made numbers: CI-based verdicts, the sign conventions, the gates."""
from __future__ import annotations

import pytest
import yaml

from tasks.bo_fusion.evaluate import METHODS, EvaluateParams, fusion_claims, spearman, transfer_claim
from tasks.core.claims import payload, rederive
from tests.conftest import ROOT

P = EvaluateParams.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())["bo_fusion"]["evaluate"])


def _scores(bomf, **others):
    base = {m: [0.70, 0.72, 0.71] for m in METHODS}
    base["bomf"] = bomf
    base.update(others)
    return base


def test_bomf_beats_a_baseline_only_when_every_seed_agrees_enough():
    clear = _scores([0.80, 0.83, 0.81])  # +0.10 on every seed
    claims, learned = fusion_claims(clear, [0.1, -0.2, 0.0], [0.8, 0.8, 0.8], P)
    verdicts = {c.name: c.verdict for c in claims}
    assert learned.passed
    assert verdicts["bomf_beats_best_checkpoint"] and verdicts["bomf_beats_swa"]
    assert verdicts["multi_objective_beats_single"] is True
    # a win on the mean carried by one seed is not a claim: the CI straddles 0
    one_seed = _scores([0.95, 0.71, 0.70])
    claims, _ = fusion_claims(one_seed, [0.0, 0.0, 0.0], [0.8, 0.8, 0.8], P)
    c = {c.name: c for c in claims}["bomf_beats_greedy_soup"]
    assert c.effect > 0 and c.ci[0] < 0 and c.verdict is False


def test_multi_objective_needs_both_single_objective_baselines():
    scores = _scores([0.80, 0.82, 0.81], metric_only_bo=[0.80, 0.83, 0.80])
    claims, _ = fusion_claims(scores, [0.0, 0.0, 0.0], [0.8, 0.8, 0.8], P)
    c = {c.name: c for c in claims}["multi_objective_beats_single"]
    assert c.verdict is False and c.parts["vs_loss_only_bo"].verdict is True


def test_mismatch_means_a_weak_rank_correlation_not_any_disagreement():
    aligned = [-0.95, -0.9, -1.0]  # the loss ranks the checkpoints as the metric does
    weak = [0.1, -0.2, 0.05]
    names = {c.name: c for c in fusion_claims(_scores([0.8] * 3), aligned, [0.8] * 3, P)[0]}
    assert names["loss_metric_mismatch"].verdict is False
    names = {c.name: c for c in fusion_claims(_scores([0.8] * 3), weak, [0.8] * 3, P)[0]}
    assert names["loss_metric_mismatch"].verdict is True
    assert spearman([0.5, 0.4, 0.3], [0.6, 0.7, 0.8]) == -1.0
    assert spearman([0.5, 0.4, 0.3], [0.25, 0.25, 0.25]) == 0.0  # a flat metric: no information


def test_a_seed_that_never_learned_makes_the_fusion_claims_untestable():
    # per seed: the early-stopped model's val macro-F1 minus the majority class's (0.25 on this task);
    # seed 1 collapsed to the majority class (gain 0.01), as a too-large transferred lr does
    claims, learned = fusion_claims(_scores([0.80, 0.83, 0.81]), [0.0] * 3, [0.55, 0.01, 0.55], P)
    assert not learned.passed and learned.threshold == P.majority_margin == 0.25
    assert all(c.verdict is None and c.gate == "members_learn" for c in claims)
    out, _ = payload(claims, [learned])
    assert all(rederive(out["claims_detail"][n]) == v for n, v in out["claims"].items())


def test_hpo_transfer_compares_the_chosen_lr_with_the_grids_best_per_seed():
    ok, g = transfer_claim([0.80, 0.79, 0.82], [0.81, 0.80, 0.82], 0.25, P)
    assert g.passed and ok.verdict is True
    bad, _ = transfer_claim([0.66, 0.70, 0.68], [0.77, 0.78, 0.76], 0.25, P)
    assert bad.verdict is False and bad.effect < P.margins.hpo_transfers
    untestable, g = transfer_claim([0.3, 0.3], [0.3, 0.3], 0.25, P)  # the grid never left the majority class
    assert not g.passed and g.value == pytest.approx(0.05) and untestable.verdict is None


def test_five_seeds_decide_a_consistent_paired_win_and_not_a_noisy_one():
    steady = _scores([0.82, 0.80, 0.84, 0.81, 0.83], best_checkpoint=[0.80, 0.78, 0.83, 0.79, 0.81])
    claims, _ = fusion_claims(steady, [0.0] * 5, [0.5] * 5, P)
    c = {c.name: c for c in claims}["bomf_beats_best_checkpoint"]
    assert c.n == 5 and c.effect == pytest.approx(0.018) and c.ci[0] > 0 and c.verdict is True
    noisy = _scores([0.82, 0.80, 0.84, 0.81, 0.83], best_checkpoint=[0.86, 0.74, 0.88, 0.75, 0.80])
    c = {c.name: c for c in fusion_claims(noisy, [0.0] * 5, [0.5] * 5, P)[0]}["bomf_beats_best_checkpoint"]
    assert c.effect > 0 and c.verdict is False
