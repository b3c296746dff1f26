"""Metrics against hand-computed cases."""
import math

import numpy as np
import pytest

from tasks import metrics


def test_nll_and_error():
    probs = np.array([[0.5, 0.5], [0.9, 0.1]])
    labels = np.array([0, 1])
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert metrics.error(probs, labels) == 0.5  # argmax ties go to class 0, which is right


def test_ece_hand_computed():
    # two samples in the 0.9 bin (one right), one in the 0.6 bin (right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert metrics.ece(probs, labels, 15) == pytest.approx(expected)


def test_ece_of_a_calibrated_predictor_is_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.ece(probs, np.array([0, 1])) == pytest.approx(0.0)


def test_ambiguity_hand_computed():
    members = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])
    labels = np.array([0])
    mean_member = -(math.log(0.8) + math.log(0.4)) / 2
    ensemble = -math.log(0.6)
    assert metrics.ambiguity(members, labels) == pytest.approx(mean_member - ensemble)
    assert metrics.ambiguity(members, labels) > 0
    assert metrics.ambiguity(np.stack([members[0], members[0]]), labels) == pytest.approx(0.0)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(12.0, rel=1e-3)


def test_macro_f1_weighs_classes_equally():
    labels = np.array([0, 0, 0, 1])
    assert metrics.macro_f1(np.array([0, 0, 0, 0]), labels, 2) == pytest.approx((2 * 0.75 / 1.75) / 2)
