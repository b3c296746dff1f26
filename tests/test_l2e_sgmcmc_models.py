"""L2E's sampler, meta-gradient and diagnostics against their definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.l2e_sgmcmc import sampler as S
from models.l2e_sgmcmc.diagnostics import ess, mode_count, rhat
from models.l2e_sgmcmc.meta import MetaConfig, antithetic_es_gradient
from models.l2e_sgmcmc.network import MLPSpec, loss_and_grad

SPEC = MLPSpec((5, 7, 3), "tanh")


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_alpha_zero_beta_r_is_exactly_sghmc():
    """With the kinetic energy |r|^2/2 the step is textbook SGHMC:
    r' = (1 - eps C) r - eps grad U + N(0, 2 C eps T), theta' = theta + eps r'."""
    x, y = _data()
    dyn = S.Dynamics(n_data=40, step_mult=0.3, friction=0.1, temperature=0.7, weight_decay=1e-3)
    theta = SPEC.init(4, torch.Generator().manual_seed(1))
    r = torch.randn_like(theta)
    _, grad = loss_and_grad(SPEC, theta, x, y)
    grad_u = dyn.potential_grad(grad, theta)
    noise = torch.randn_like(theta)
    got_theta, got_r = S.sgmcmc_step(theta, r, grad_u, None, dyn.eps, dyn, S.SGHMCKinetic(), noise)
    eps, c = math.sqrt(0.3 / 40), 0.1
    want_r = (1 - eps * c) * r - eps * 40 * (grad + 1e-3 * theta) + math.sqrt(2 * c * eps * 0.7) * noise
    torch.testing.assert_close(got_r, want_r)
    torch.testing.assert_close(got_theta, theta + eps * want_r)


def test_step_size_uses_the_task_training_set_size():
    assert S.Dynamics(37, 0.5, 0.1, 1.0, 0.0).eps == pytest.approx(math.sqrt(0.5 / 37))
    cfg = MetaConfig(hidden=4, multiplier=0.1, pairs=1, sigma=0.01, lr=0.01, clip=1.0, unroll=5, batch_size=4,
                     samples=2, sample_window=2, step_mult=0.5, friction=0.1, temperature=1.0, weight_decay=0.0,
                     loss_cap=3.0)
    assert cfg.dynamics(123).eps == pytest.approx(math.sqrt(0.5 / 123))
    assert cfg.dynamics(50_000).eps != cfg.dynamics(123).eps  # nothing hard-coded


def test_es_gradient_on_a_quadratic_matches_the_true_gradient_in_expectation():
    a = torch.tensor([1.0, 2.0, 0.5, 3.0])
    c = torch.tensor([0.3, -0.2, 1.0, 0.0])
    phi = torch.tensor([1.0, 1.0, -1.0, 0.5])
    loss = lambda rows, groups: 0.5 * (a * (rows - c) ** 2).sum(1)
    gen = torch.Generator().manual_seed(0)
    grads = torch.stack([antithetic_es_gradient(loss, phi, 0.01, 64, gen)[0] for _ in range(300)])
    true = a * (phi - c)
    se = grads.std(0) / math.sqrt(len(grads))
    assert ((grads.mean(0) - true).abs() < 4 * se + 1e-6).all(), (grads.mean(0), true)


def test_feature_normalisation_is_per_tensor_rms():
    ids = SPEC.tensor_ids()
    x = torch.randn(2, 3, SPEC.dim) * torch.linspace(0.1, 10, SPEC.dim)
    out = S.normalise_per_tensor(x, ids, 4)
    for t in range(4):
        ms = (out[..., ids == t] ** 2).mean(-1)
        torch.testing.assert_close(ms, torch.ones_like(ms), atol=1e-3, rtol=1e-3)
    scaled = x.clone()
    scaled[..., ids == 1] *= 100.0  # rescaling one tensor changes nothing
    torch.testing.assert_close(S.normalise_per_tensor(scaled, ids, 4), out, atol=1e-4, rtol=1e-4)


def _reference_kinetic(phi, hidden, mult, spec, theta, r, grad_u, ema, r_new):
    """Per chain, per layer tensor, with nn.Linear layers: the definition the batched code must match."""
    net = torch.nn.Sequential(torch.nn.Linear(9, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    w1, b1, w2, b2, w3, b3 = torch.split(phi, [9 * hidden, hidden, hidden * hidden, hidden, hidden * 2, 2])
    with torch.no_grad():
        for lin, w, b, fan_in in ((net[0], w1, b1, 9), (net[2], w2, b2, hidden), (net[4], w3, b3, hidden)):
            lin.weight.copy_(w.view(fan_in, -1).T)
            lin.bias.copy_(b)
    ids = spec.tensor_ids()
    alpha, beta, beta_new = torch.zeros_like(r), torch.zeros_like(r), torch.zeros_like(r)
    rms = lambda v: v / torch.sqrt((v ** 2).mean(0, keepdim=True) + 1e-5)
    for b in range(r.shape[0]):
        for t in range(2 * len(spec.layers)):
            m = ids == t
            feats = torch.stack([grad_u[b, m], theta[b, m], r[b, m], *ema[b, :, m]], 1)
            out = net(rms(feats))
            alpha[b, m], beta[b, m] = out[:, 0] * mult, out[:, 1] * mult
            feats[:, 2] = r_new[b, m]
            beta_new[b, m] = net(rms(feats))[:, 1] * mult
    return alpha, beta, beta_new


def test_vectorised_update_matches_a_per_tensor_loop():
    hidden, mult = 6, 0.1
    phi = S.init_kinetic_net(hidden, torch.Generator().manual_seed(3))
    theta = SPEC.init(3, torch.Generator().manual_seed(4))
    r, grad_u, r_new = torch.randn_like(theta), torch.randn_like(theta) * 50, torch.randn_like(theta)
    ema = torch.randn(3, 6, SPEC.dim)
    kin = S.LearnedKinetic(phi, hidden, mult, mult, SPEC)
    alpha, beta, cache = kin.gradients(theta, r, grad_u, ema)
    ref = _reference_kinetic(phi, hidden, mult, SPEC, theta, r, grad_u, ema, r_new)
    with torch.no_grad():
        torch.testing.assert_close(alpha, ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(beta, ref[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kin.beta_at(r_new, cache), ref[2], atol=1e-5, rtol=1e-4)


def test_copies_of_the_meta_parameters_drive_their_own_chains():
    hidden = 4
    gen = torch.Generator().manual_seed(5)
    phis = torch.stack([S.init_kinetic_net(hidden, gen) for _ in range(2)])
    theta = SPEC.init(4, gen)
    r, grad_u, ema = torch.randn_like(theta), torch.randn_like(theta), torch.randn(4, 6, SPEC.dim)
    both, _, _ = S.LearnedKinetic(phis, hidden, 1.0, 1.0, SPEC).gradients(theta, r, grad_u, ema)
    for m in range(2):
        rows = slice(2 * m, 2 * m + 2)
        one, _, _ = S.LearnedKinetic(phis[m], hidden, 1.0, 1.0, SPEC).gradients(theta[rows], r[rows], grad_u[rows],
                                                                               ema[rows])
        torch.testing.assert_close(both[rows], one)


def test_mode_count_separates_two_minima_from_one_basin():
    double_well = lambda rows: ((rows[:, 0] ** 2 - 1) ** 2) * 5
    two = torch.tensor([[-1.0], [-0.98], [1.0], [1.02]])
    count, bars = mode_count(two, double_well, points=21, delta=0.05)
    assert count == 2 and bars[0, 2] > 4
    bowl = lambda rows: (rows[:, 0] - 1) ** 2
    one = torch.tensor([[0.8], [1.0], [1.3], [0.9]])
    assert mode_count(one, bowl, points=21, delta=0.05)[0] == 1


def test_rhat_and_ess_on_mixed_and_stuck_chains():
    rng = np.random.default_rng(0)
    mixed = rng.normal(size=(3, 400, 5))
    assert np.all(np.abs(rhat(mixed) - 1) < 0.02)
    assert np.all(ess(mixed) > 600)
    stuck = mixed + np.array([0.0, 3.0, -3.0])[:, None, None]
    assert np.all(rhat(stuck) > 2)
    sticky = np.cumsum(rng.normal(size=(3, 400, 2)), 1)  # random walks: strongly autocorrelated
    assert np.all(ess(sticky) < 100)


def test_cyclical_schedule_and_sample_steps():
    sched = S.cyclical_schedule(100, 2, 0.5)
    assert sched(0) == (1.0, 0.0) and sched(50)[0] == 1.0 and sched(99)[1] == 1.0
    steps = S.cyclical_sample_steps(100, 2, 4, 0.5)
    assert steps == sorted(steps) and len(steps) == 4 and steps[-1] == 99 and steps[1] == 49
    assert all(sched(t)[1] == 1.0 for t in steps)  # samples come from the noisy phase
    assert S.thinned_steps(100, 20, 4) == [39, 59, 79, 99]


def test_batched_deep_ensemble_equals_independent_members():
    x, y = _data()
    theta0 = SPEC.init(3, torch.Generator().manual_seed(6))
    gen = lambda: torch.Generator().manual_seed(7)
    together = S.deep_ensemble(SPEC, x, y, theta0, 5, 8, 0.01, 1e-3, gen())
    g = gen()
    idx = torch.randint(0, 40, (5, 3, 8), generator=g)  # the same minibatches, drawn step by step
    for b in range(3):
        theta = theta0[b:b + 1].clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=0.01)
        for t in range(5):
            from models.l2e_sgmcmc.network import nll_per_row

            loss = nll_per_row(SPEC, theta, x[idx[t, b]][None], y[idx[t, b]][None]).sum() + 5e-4 * (theta ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(together[b], theta.detach()[0], atol=1e-6, rtol=1e-5)


def test_slice_and_scatter_normalisations_agree(monkeypatch):
    ids = SPEC.tensor_ids()
    x = torch.randn(2, 3, SPEC.dim) * 7
    sliced = S.normalise_per_tensor(x, ids, 4)
    monkeypatch.setattr(S, "SLICE_TENSORS", 0)
    torch.testing.assert_close(S.normalise_per_tensor(x, ids, 4), sliced, atol=1e-5, rtol=1e-5)
