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


def test_swag_low_rank_moments_deviations_and_sample_covariance():
    """SWAG keeps the last K deviations from the running mean and samples
    N(mean, 1/2 (diag + D D^T / (K - 1))) (Maddox et al. 2019, Eq. 1)."""
    model = nn.Linear(2, 1, bias=False)
    swag = L.SWAG(rank=2)
    for w in ((1.0, 0.0), (3.0, 2.0), (5.0, 1.0)):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([w]))
        swag.collect(model)
    state = swag.state()
    iters = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]])
    assert torch.allclose(state["mean"], iters.mean(0))
    assert torch.allclose(state["sq_mean"], (iters ** 2).mean(0))
    # deviations of the last K = 2 iterates from the running mean after each of them
    assert torch.allclose(state["dev"], torch.stack([iters[1] - iters[:2].mean(0), iters[2] - iters.mean(0)]))
    diag = torch.diag(iters.var(0, unbiased=False))
    expected = 0.5 * (diag + state["dev"].T @ state["dev"] / (2 - 1))
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([L.SWAG.sample(state, gen) for _ in range(20000)])
    assert torch.allclose(samples.mean(0), state["mean"], atol=0.05)
    assert torch.allclose(torch.cov(samples.T), expected, atol=0.1 * expected.abs().max().item())
    assert torch.cov(samples.T)[0, 1].abs() > 0.2  # the low-rank part correlates the weights
    params = L.unflatten(model, samples[0])
    assert params["weight"].shape == (1, 2) and torch.equal(L.flat_params(model), iters[2])
    with pytest.raises(ValueError):
        L.SWAG(rank=1)


def test_ivon_learns_and_returns_its_posterior_scale():
    """IVON (ivon-opt) lowers the training loss of a separable toy problem; its posterior sigma is
    1 / sqrt(ess (h + delta)) > 0 and its samples scatter around the mean with that scale."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = MLP(4, [16], 2)
    loss0 = nn.functional.cross_entropy(model(x), y).item()
    state = L.fit_ivon(model, x, y, epochs=30, lr=0.1, batch_size=32, hess_init=0.5, weight_decay=1e-3,
                       beta2=0.99999, generator=torch.Generator().manual_seed(0))
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * loss0
    assert torch.equal(state["mean"], L.flat_params(model))
    assert (state["sigma"] > 0).all() and (state["sigma"] <= 1 / (256 * 1e-3) ** 0.5 + 1e-6).all()
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([L.sample_diagonal(state, gen) for _ in range(4000)])
    assert torch.allclose(draws.std(0) / state["sigma"], torch.ones_like(state["sigma"]), atol=0.1)


def test_cyclic_cosine_restarts():
    assert L.cyclic_cosine_lr(0, 10, 0.1) == pytest.approx(0.1)
    assert L.cyclic_cosine_lr(5, 10, 0.1) == pytest.approx(0.05)
    assert L.cyclic_cosine_lr(10, 10, 0.1) == pytest.approx(0.1)


def test_ensemble_averages_probabilities():
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert torch.allclose(L.ensemble_mean(p), torch.tensor([[0.5, 0.5]]))
