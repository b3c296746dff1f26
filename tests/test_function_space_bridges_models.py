"""DBFS building blocks: the reference process and its bridge, the samplers, the resolution-free
operator, IDBM training, the GP posterior and the SOC control, the scores and the claim rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.function_space_bridges.bridge import TrainConfig, sample, train_idbm
from models.function_space_bridges.operator import OperatorConfig, OperatorTransformer
from models.function_space_bridges.posterior import (ControlNet, basis, exact_posterior, prior_variance,
                                                     simulate_controlled)
from models.function_space_bridges.spectral import SpectralOU, dct_matrix


def test_dct_round_trip_and_l2_normalised_coefficients():
    for shape in [(32,), (17,), (8, 8), (16, 16)]:
        ou = SpectralOU(shape, 1.0, 1.0)
        f = torch.randn(3, *shape, dtype=torch.float64)
        assert torch.allclose(ou.from_coeffs(ou.to_coeffs(f)), f, atol=1e-10)
    c = dct_matrix(12)
    assert torch.allclose(c @ c.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    # phi_3 = sqrt 2 cos(3 pi x) has the coefficient vector e_3 on every grid (L2-normalised)
    for n in (16, 64, 128):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        coeffs = SpectralOU((n,), 1.0, 1.0).to_coeffs(math.sqrt(2) * torch.cos(3 * math.pi * x))
        assert coeffs[3] == pytest.approx(1.0, abs=1e-10) and coeffs.abs().sum() == pytest.approx(1.0, abs=1e-9)


def test_eigenvalues_are_fixed_across_resolutions():
    coarse, fine = SpectralOU((32,), 1.0, 1.0), SpectralOU((128,), 1.0, 1.0)
    assert torch.equal(coarse.eigenvalues, fine.eigenvalues[:32])
    assert coarse.eigenvalues[1] == pytest.approx(math.pi ** 2 + 1)
    img_coarse, img_fine = SpectralOU((16, 16), 1.2, 1.0), SpectralOU((32, 32), 1.2, 1.0)
    assert torch.equal(img_coarse.eigenvalues, img_fine.eigenvalues[:16, :16])
    assert torch.equal(img_coarse.diffusion, img_fine.diffusion[:16, :16])
    scaled = [SpectralOU((n, n), 1.2, 1.0, laplacian_scale=1 / 256) for n in (16, 32)]
    assert torch.equal(scaled[0].eigenvalues, scaled[1].eigenvalues[:16, :16])


def test_closed_form_bridge_marginal_matches_a_simulated_ou_bridge_per_mode():
    """Simulate the unconditioned OU per mode with fine Euler-Maruyama steps, condition on X_1 by linear
    regression (the joint is Gaussian), and compare with the closed-form bridge mean and variance."""
    torch.manual_seed(0)
    ou = SpectralOU((3,), 0.5, 0.8)  # a = 1, pi^2 + 1, 4 pi^2 + 1
    a, g = ou.eigenvalues, ou.diffusion
    x0, t_mid, steps, paths = torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64), 0.4, 2000, 100_000
    dt = 1.0 / steps
    x = x0.expand(paths, 3).clone()
    for i in range(steps):
        x = x - a * x * dt + g * math.sqrt(dt) * torch.randn_like(x)
        if i + 1 == round(t_mid * steps):
            xt = x.clone()
    x1 = x
    for k in range(3):
        cov = torch.cov(torch.stack([xt[:, k], x1[:, k]]))
        slope = cov[0, 1] / cov[1, 1]
        x1_value = 0.5
        cond_mean = xt[:, k].mean() + slope * (x1_value - x1[:, k].mean())
        cond_var = cov[0, 0] - slope * cov[0, 1]
        mean, var = ou.bridge_moments(x0[None], torch.full((1, 3), x1_value, dtype=torch.float64),
                                      torch.zeros(1), torch.full((1,), t_mid))
        assert mean[0, k].item() == pytest.approx(cond_mean.item(), abs=0.01)
        assert var[0, k].item() == pytest.approx(cond_var.item(), rel=0.03)


def test_bridge_sample_hits_its_endpoints():
    ou = SpectralOU((16,), 1.0, 1.0)
    f0, f1 = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    assert torch.allclose(ou.bridge_sample(f0, f1, torch.zeros(4)), f0, atol=1e-8)
    assert torch.allclose(ou.bridge_sample(f0, f1, torch.full((4,), 1.0 - 1e-9)), f1, atol=1e-3)


def test_exact_step_is_stable_at_128_points_where_euler_maruyama_is_flagged_and_diverges():
    torch.manual_seed(0)
    ou, steps = SpectralOU((128,), 1.0, 1.0), 30
    assert ou.max_stiffness(1.0 / steps) > 2  # a dt of the stiffest mode: EM is unstable
    x = (torch.arange(128, dtype=torch.float64) + 0.5) / 128
    target = torch.exp(-0.5 * (x - 0.5) ** 2 / 0.1 ** 2).expand(4, 128)
    predict = lambda f, t: target  # a perfect endpoint predictor
    f0 = torch.randn(4, 128, dtype=torch.float64)
    exact = sample(predict, ou, f0, steps, "exact")
    em = sample(predict, ou, f0, steps, "euler_maruyama")
    assert torch.allclose(exact, target, atol=1e-8)
    assert not torch.isfinite(em).all() or em.abs().max() > 1e6
    # the official code's spectrum (pi^2 k^2 / n^2 + 1) is mild: there Euler-Maruyama is fine
    mild = SpectralOU((128,), 1.0, 1.0, laplacian_scale=1 / 128 ** 2)
    assert mild.max_stiffness(1.0 / steps) < 2
    em = sample(predict, mild, f0, steps, "euler_maruyama")
    assert torch.isfinite(em).all() and (em - target).abs().max() < 0.5


def test_operator_runs_on_unseen_grids():
    torch.manual_seed(0)
    for dim, shapes in ((1, [(32,), (64,), (128,), (45,)]), (2, [(16, 16), (32, 32), (20, 24)])):
        net = OperatorTransformer(OperatorConfig(dim, 1, 16, 4, 2, 1, 1, 4, 2.0, 2))
        from models.function_space_bridges.bridge import EndpointPredictor

        predict = EndpointPredictor(net)
        for shape in shapes:
            f = torch.randn(3, *shape) if dim == 1 else torch.randn(3, 1, *shape)
            out = predict(f, torch.rand(3))
            assert out.shape == f.shape and torch.isfinite(out).all()


def test_idbm_chain_trains_every_model_and_baseline_at_equal_steps():
    torch.manual_seed(0)
    ou = SpectralOU((16,), 1.0, 1.0)
    pi0, pi1 = torch.randn(40, 16), torch.rand(40, 16) + 1.0
    cfg = TrainConfig(3, 5, 8, 1e-3, 0.9, 1.0, 4, 8, 2, 8)
    out = train_idbm(lambda: OperatorTransformer(OperatorConfig(1, 1, 16, 4, 2, 1, 1, 4, 2.0, 2)), ou, pi0, pi1, cfg)
    assert set(out["states"]) == {"first", "first_equal_steps", "final", "backward"}
    assert len(out["curves"]["iteration1"]) + len(out["curves"]["first_continued"]) == 15  # = 3 x 5
    assert sum(len(out["curves"][f"iteration{i}"]) for i in (1, 2, 3)) == 15
    assert not torch.equal(out["states"]["first"]["value_out.weight"], out["states"]["final"]["value_out.weight"])
    with pytest.raises(ValueError, match="odd"):
        train_idbm(lambda: None, ou, pi0, pi1, TrainConfig(2, 5, 8, 1e-3, 0.9, 1.0, 4, 8, 2, 8))


def test_exact_gp_posterior_matches_gaussian_conditioning_on_the_grid():
    ou = SpectralOU((12,), 0.6, 1.5)
    b = basis(ou).T
    k = b @ torch.diag(prior_variance(ou)) @ b.T  # prior covariance of the grid values
    y = torch.randn(2, 12, dtype=torch.float64)
    mask = torch.zeros(2, 12)
    mask[0, [1, 5, 9]] = 1
    mask[1, [0, 2, 3, 4, 11]] = 1
    mean, var = exact_posterior(ou, y, mask, 0.3)
    for i in range(2):
        o = mask[i].bool()
        gain = k[:, o] @ torch.linalg.inv(k[o][:, o] + 0.09 * torch.eye(int(o.sum()), dtype=torch.float64))
        assert torch.allclose(mean[i], gain @ y[i, o], atol=1e-8)
        assert torch.allclose(var[i], torch.diagonal(k - gain @ k[o]), atol=1e-8)


def test_zero_control_samples_the_prior():
    """With u = 0 the controlled SDE is the reference process from 0: its terminal law is the prior."""
    torch.manual_seed(0)
    ou = SpectralOU((12,), 0.6, 1.5)
    net = ControlNet(12, 8, 1)  # zero-initialised output layer: u = 0
    y, mask = torch.zeros(20_000, 12), torch.zeros(20_000, 12)
    f1, kl = simulate_controlled(net, ou, y, mask, 10)
    assert kl.abs().max() == 0
    prior_var = torch.diagonal(basis(ou).T @ torch.diag(prior_variance(ou)) @ basis(ou)).float()
    assert torch.allclose(f1.float().var(0), prior_var, rtol=0.05)


def test_scores_mmd_and_density_validity():
    from tasks.function_space_bridges.data import gp_samples, mixture_densities, mixture_parameters
    from tasks.function_space_bridges.scoring import density_validity, median_bandwidth, mmd2

    rng = np.random.default_rng(0)
    params = mixture_parameters(400, (1, 3), (0.15, 0.85), (0.05, 0.15), rng)
    a, b = (torch.from_numpy(mixture_densities(params[i::2], 64)) for i in (0, 1))
    gp = torch.from_numpy(gp_samples(200, 64, 0.2, rng))
    bw = median_bandwidth(a)
    assert abs(mmd2(a, b, bw)) < 0.02 < mmd2(gp, b, bw)
    valid = density_validity(a)
    assert valid["mass_error"] < 1e-6 and valid["negative_mass"] == 0.0
    assert density_validity(gp)["negative_mass"] > 0.2


def test_resolution_rule_accepts_a_small_relative_or_absolute_change():
    from tasks.function_space_bridges.decide import resolution_excess

    assert resolution_excess(10.0, 11.5, 0.2, 0.5) < 1          # 15% relative
    assert resolution_excess(0.002, 0.005, 0.2, 0.01) < 1       # 150% relative but +0.003 absolute
    assert resolution_excess(0.1, 0.2, 0.2, 0.01) > 1           # neither
