"""LPE-BSR's rounding and ensembling, checked against the paper's definitions."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from models.common.mlp import MLP
from models import lowprec_ensemble as L


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    w = torch.randn(4, 7)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([L.stochastic_round(w, 3, gen) for _ in range(4000)])
    s = L.channel_scale(w, 3)
    # mean of many Bernoulli draws converges to w (standard error <= s/2/sqrt(n))
    assert torch.all((draws.mean(0) - w).abs() <= 4 * s / 2 / math.sqrt(4000))


def test_draws_lie_on_the_two_neighbouring_grid_points():
    w = torch.randn(3, 5)
    s = L.channel_scale(w, 4)
    draw = L.stochastic_round(w, 4, torch.Generator().manual_seed(0))
    q = draw / s
    assert torch.allclose(q, q.round(), atol=1e-5)
    assert torch.all((q.round() == torch.floor(w / s)) | (q.round() == torch.floor(w / s) + 1))


def test_grid_is_symmetric_per_output_channel_and_clipped():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    for bits in (2, 3, 8):
        qm = 2 ** (bits - 1) - 1
        s = L.channel_scale(w, bits)
        assert torch.allclose(s.flatten(), w.abs().amax(1) / qm)
        for out in (L.round_to_nearest(w, bits), L.stochastic_round(w, bits)):
            assert torch.all((out / s).round().abs() <= qm)
    # the channel maximum is exactly representable, so it is never rounded away
    assert torch.allclose(L.round_to_nearest(w, 3).abs().amax(1), w.abs().amax(1))


def test_zero_channel_stays_zero():
    w = torch.zeros(2, 3)
    assert torch.equal(L.stochastic_round(w, 4), w)
    assert torch.equal(L.round_to_nearest(w, 4), w)


def test_rtn_is_deterministic_and_sr_is_not():
    w = torch.randn(8, 8)
    assert torch.equal(L.round_to_nearest(w, 3), L.round_to_nearest(w, 3))
    assert not torch.equal(L.stochastic_round(w, 3), L.stochastic_round(w, 3))


@pytest.mark.parametrize("bits", [0, 1, 33])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        L.qmax(bits)


def test_only_linear_and_conv_weights_are_quantized():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 5, 5))
    assert L.quantizable_names(model) == ["0.weight", "3.weight"]
    params = L.quantized_params(model, 4)
    assert set(params) == {"0.weight", "3.weight"}


def test_members_are_streamed_and_differ():
    torch.manual_seed(0)
    model = MLP(4, [8], 3)
    x = torch.randn(10, 4)
    gen = torch.Generator().manual_seed(0)
    members = list(L.lpe_bsr_members(model, lambda: [(x,)], 3, 3, gen))
    assert len(members) == 3 and members[0].shape == (10, 3)
    assert not torch.allclose(members[0], members[1])
    assert torch.allclose(members[0].sum(-1), torch.ones(10))
    # the model's own weights are untouched by the functional calls
    assert torch.allclose(L.predict_probs(model, lambda: [(x,)]), torch.softmax(model(x), -1))


def test_memory_counts_quantized_and_full_precision_parts():
    model = MLP(4, [8], 3)  # weights 32+24, biases 8+3
    assert L.count_params(model) == (56, 11)
    assert L.memory_bits(model, 10, 4) == 10 * (4 * 56 + 32 * 11)
    assert L.memory_bits(model, 1, None) == 32 * 67


def test_swag_diagonal_moments_and_samples():
    model = nn.Linear(2, 1, bias=False)
    swag = L.SWAGDiagonal(model)
    for v in (1.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(v)
        swag.collect(model)
    state = swag.state()
    assert torch.allclose(state["mean.weight"], torch.full((1, 2), 2.0))
    assert torch.allclose(state["sq_mean.weight"], torch.full((1, 2), 5.0))
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([L.SWAGDiagonal.sample(state, gen)["weight"] for _ in range(3000)])
    assert abs(samples.mean().item() - 2.0) < 0.1 and abs(samples.std().item() - 1.0) < 0.1


def test_cyclic_cosine_restarts():
    assert L.cyclic_cosine_lr(0, 10, 0.1) == pytest.approx(0.1)
    assert L.cyclic_cosine_lr(5, 10, 0.1) == pytest.approx(0.05)
    assert L.cyclic_cosine_lr(10, 10, 0.1) == pytest.approx(0.1)


def test_ensemble_averages_probabilities():
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert torch.allclose(L.ensemble_mean(p), torch.tensor([[0.5, 0.5]]))
