"""Unit tests of the ACSSM method: closed-form moments, parallel scan, causality, masking, input checks."""
import math

import pytest
import torch
import torchsde

from models.acssm.networks import ACSSM, GRUDelta, LossWeights, TorchsdeLatentSDE
from models.acssm.sde import LinearLatentSDE, affine_scan, affine_sequential, check_series, time_gaps

torch.set_flush_denormal(True)


def _batch(B=3, K=12, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(B, K, generator=g) * 0.5 + 0.05, dim=1)
    values = torch.randn(B, K, D, generator=g)
    mask = (torch.rand(B, K, D, generator=g) > 0.3).float()
    return times, values, mask


class _LinearSDEForTorchsde(torch.nn.Module):
    """The same linear SDE written as a drift for torchsde (alpha piecewise constant on the gaps)."""
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, lin: LinearLatentSDE, alpha, knots):
        super().__init__()
        self.alpha, self.knots, self.sigma = alpha, knots, lin.sigma   # alpha [K, d]; knots t_1..t_K
        E = lin.eigenbasis
        self.drift = [E @ torch.diag(lin.rates(a).clamp(max=-1e-4)) @ E.T for a in alpha]  # A(alpha_k)

    def f(self, t, y):
        k = int(torch.searchsorted(self.knots, t.reshape(1), right=True).clamp(max=len(self.knots) - 1))
        return y @ self.drift[k].T + self.alpha[k]                      # A(alpha) y + alpha

    def g(self, t, y):
        return torch.full_like(y, self.sigma)


@torch.no_grad()
def test_closed_form_moments_match_euler_maruyama_in_torchsde():
    torch.manual_seed(0)
    d, K, n_paths = 3, 4, 8000
    lin = LinearLatentSDE(d, num_basis=4, sigma=0.7, init_sigma=0.5)
    alpha = torch.randn(K, d) * 1.5
    dt = torch.tensor([0.3, 0.5, 0.2, 0.6])
    times = torch.cumsum(dt, 0)
    mean, cov = lin.state_moments(alpha[None], dt[None])                # [1,K,d], [1,K,d,d]
    m0, v0 = lin.initial(1)
    E = lin.eigenbasis
    x0 = (m0 + v0.sqrt() * torch.randn(n_paths, d)) @ E.T               # X_0 ~ N(E m0, E diag(v0) E^T)
    grid = torch.cat([torch.zeros(1), times])
    sde = _LinearSDEForTorchsde(lin, alpha, grid[1:])
    # knots: alpha[k] acts on [t_{k-1}, t_k) -> searchsorted(t_1..t_K, t, right) = k
    path = torchsde.sdeint(sde, x0, grid, method="euler", dt=2e-3)[1:]  # [K, n, d]
    for k in range(K):
        emp_mean = path[k].mean(0)
        emp_cov = torch.cov(path[k].T)
        se = (emp_cov.diagonal() / n_paths).sqrt()
        assert ((emp_mean - mean[0, k]).abs() <= 4.5 * se + 2e-3).all(), (k, emp_mean, mean[0, k])
        rel = (emp_cov - cov[0, k]).norm() / cov[0, k].norm()
        assert rel < 0.05, (k, rel)
    # using absolute times instead of gaps (the official code's transition) is measurably wrong
    wrong, _ = lin.state_moments(alpha[None], times[None])
    assert (wrong[0, -1] - path[-1].mean(0)).abs().max() > 20 * se.max()


def test_parallel_scan_equals_sequential_recursion_values_and_gradients():
    torch.manual_seed(1)
    a = (torch.rand(4, 37, 5) * 0.9 + 0.05).requires_grad_()
    b = torch.randn(4, 37, 5, requires_grad=True)
    x0 = torch.randn(4, 5)
    ca, cb = affine_scan(a, b, dim=1)
    par = ca * x0[:, None] + cb
    seq = affine_sequential(a, b, x0, dim=1)
    assert torch.allclose(par, seq, atol=1e-5, rtol=1e-5)
    g_par = torch.autograd.grad(par.square().sum(), (a, b))
    g_seq = torch.autograd.grad(seq.square().sum(), (a, b))
    for gp, gs in zip(g_par, g_seq):
        assert torch.allclose(gp, gs, atol=1e-4, rtol=1e-4)


def test_acssm_parallel_and_sequential_moments_agree():
    torch.manual_seed(2)
    lin = LinearLatentSDE(6, num_basis=5)
    alpha, dt = torch.randn(2, 30, 6), torch.rand(2, 30)
    mp, vp = lin.moments(alpha, dt, parallel=True)
    ms, vs = lin.moments(alpha, dt, parallel=False)
    assert torch.allclose(mp, ms, atol=1e-5) and torch.allclose(vp, vs, atol=1e-5)
    assert (vp > 0).all()


def test_variance_grows_with_the_gap_and_relaxes_to_stationary():
    lin = LinearLatentSDE(2, num_basis=1, sigma=1.0, init_sigma=1e-4)
    alpha = torch.zeros(1, 1, 2)
    v_small = lin.moments(alpha, torch.tensor([[0.01]]))[1]
    v_big = lin.moments(alpha, torch.tensor([[100.0]]))[1]
    lam = lin.rates(alpha)[0, 0]
    assert (v_small < v_big).all()
    assert torch.allclose(v_big[0, 0], 1.0 / (2 * lam.abs()), rtol=1e-3)   # OU stationary variance


@pytest.mark.parametrize("cls", [ACSSM, GRUDelta])
def test_causal_model_never_sees_the_future(cls):
    torch.manual_seed(3)
    kw = dict(width=16, state_dim=8, n_layers=2, n_heads=2, causal=True) if cls is ACSSM else dict(width=16)
    model = cls(obs_dim=4, out_dim=2, **kw).eval()
    times, values, mask = _batch()
    cut = 7
    perturbed = values.clone()
    perturbed[:, cut:] += 10 * torch.randn_like(perturbed[:, cut:])
    mask2 = mask.clone()
    mask2[:, cut:] = 1.0
    key = "latent_mean" if cls is ACSSM else "pred"
    with torch.no_grad():
        a = model(times, values, mask)[key]
        b = model(times, perturbed, mask2)[key]
    a, b = (a, b) if cls is ACSSM else (a[0], b[0])
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-5)
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


def test_full_attention_does_see_the_future():
    torch.manual_seed(4)
    model = ACSSM(obs_dim=4, out_dim=2, width=16, state_dim=8, causal=False).eval()
    times, values, mask = _batch()
    perturbed = values.clone()
    perturbed[:, 7:] += 10.0
    with torch.no_grad():
        a = model(times, values, mask)["latent_mean"]
        b = model(times, perturbed, mask)["latent_mean"]
    assert not torch.allclose(a[:, :7], b[:, :7], atol=1e-3)


@pytest.mark.parametrize("cls", [ACSSM, GRUDelta, TorchsdeLatentSDE])
def test_values_where_masked_out_are_ignored_including_nan(cls):
    torch.manual_seed(5)
    model = cls(obs_dim=4, out_dim=2, width=16, state_dim=8).eval()
    times, values, mask = _batch()
    junk = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    other = torch.where(mask > 0, values, torch.randn_like(values) * 100)
    outs = []
    for v in (junk, other):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(model(times, v, mask, n_samples=2)["pred"])
    assert torch.isfinite(outs[0]).all()
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_padding_does_not_change_valid_outputs():
    torch.manual_seed(6)
    model = ACSSM(obs_dim=4, out_dim=2, width=16, state_dim=8).eval()
    times, values, mask = _batch(B=1, K=8)
    pad_t = torch.cat([times, times[:, -1:] + 1.0, torch.zeros(1, 2)], 1)
    pad_v = torch.cat([values, torch.randn(1, 3, 4)], 1)
    pad_m = torch.cat([mask, torch.ones(1, 3, 4)], 1)
    valid = torch.tensor([[True] * 8 + [False] * 3])
    with torch.no_grad():
        a = model(times, values, mask)["latent_mean"]
        b = model(pad_t, pad_v, pad_m, valid)["latent_mean"]
    assert torch.allclose(a, b[:, :8], atol=1e-5)


def test_torchsde_baseline_gathers_irregular_times_from_the_union_grid():
    torch.manual_seed(7)
    model = TorchsdeLatentSDE(obs_dim=4, out_dim=2, width=16, state_dim=8, dt=0.05)
    times, values, mask = _batch(B=3, K=5)
    out = model(times, values, mask, n_samples=2)
    assert out["pred"].shape == (2, 3, 5, 2)
    assert out["n_grid"] == len(torch.unique(times)) + 1
    target = torch.randn(3, 5, 2)
    loss, parts = model.loss(out, target, torch.ones_like(target), LossWeights(1e-2, 1e-2))
    loss.backward()
    assert model.control.weight.grad.abs().sum() > 0 and math.isfinite(float(loss.detach()))


def test_elbo_terms_and_classification_loss():
    torch.manual_seed(8)
    model = ACSSM(obs_dim=4, out_dim=5, task="classification", width=16, state_dim=8)
    times, values, mask = _batch()
    out = model(times, values, mask, n_samples=3)
    labels = torch.randint(0, 5, times.shape)
    loss0, parts = model.loss(out, labels, torch.ones_like(times), LossWeights(0.0, 0.0))
    loss1, _ = model.loss(out, labels, torch.ones_like(times), LossWeights(1.0, 1.0))
    assert parts["control"] > 0 and parts["potential"] != 0
    assert torch.isclose(loss1 - loss0, torch.tensor(parts["control"] + parts["potential"]), rtol=1e-4)
    # control cost is 1/2 sum ||alpha||^2 dt
    expect = 0.5 * ((out["alpha"] ** 2).sum(-1) * time_gaps(times, out["valid"])).sum()
    assert torch.isclose(out["control_cost"], expect)
    loss1.backward()


@pytest.mark.parametrize("mutate, msg", [
    (lambda t, v, m: (t.flip(1), v, m), "strictly increasing"),
    (lambda t, v, m: (torch.cat([t[:, :1], t[:, :1], t[:, 2:]], 1), v, m), "strictly increasing"),
    (lambda t, v, m: (t, v.masked_fill(m > 0, float("nan")), m), "NaN in an observed"),
    (lambda t, v, m: (t[:, :0], v[:, :0], m[:, :0]), "empty"),
    (lambda t, v, m: (t, v, m * 2), "mask must hold"),
    (lambda t, v, m: (t, v[..., :2], m), "expected times"),
])
def test_malformed_series_give_clear_errors(mutate, msg):
    times, values, mask = _batch()
    with pytest.raises(ValueError, match=msg):
        check_series(*mutate(times, values, mask))


def test_all_padding_series_is_rejected_and_bad_task_too():
    times, values, mask = _batch(B=2)
    valid = torch.ones_like(times, dtype=torch.bool)
    valid[1] = False
    with pytest.raises(ValueError, match="empty series at batch index 1"):
        check_series(times, values, mask, valid)
    with pytest.raises(ValueError, match="task must be one of"):
        ACSSM(obs_dim=4, out_dim=2, task="forecast")


def test_noskip_ablation_decoder_sees_only_the_latent_sample():
    from models.acssm.fit import build_model

    cfg = dict(width=8, state_dim=4, num_basis=2, n_layers=1, n_heads=1, dropout=0.0, time_scale=1.0,
               init_sigma=1.0, skip=True, sde_dt=0.1, obs_var=0.01, encoder="mlp")
    full, noskip = (build_model(m, "regression", 4, 2, cfg, causal=False) for m in ("acssm", "acssm_noskip"))
    assert full.skip and full.decoder[0].in_features == 4 + 8
    assert not noskip.skip and noskip.decoder[0].in_features == 4 and isinstance(noskip, ACSSM)
    # with the control cut, the no-skip model's predictions no longer depend on the inputs; the skip
    # model's still do (its decoder bypasses the latent SDE through z_k)
    times, values, mask = _batch()
    with torch.no_grad():
        for m in (full, noskip):
            m.control.weight.zero_()
            m.control.bias.zero_()
        outs = {}
        for name, m in (("full", full), ("noskip", noskip)):
            for k, v in (("a", values), ("b", values + 1.0)):
                torch.manual_seed(0)
                outs[name, k] = m(times, v, mask, n_samples=2)["pred"]
    assert torch.equal(outs["noskip", "a"], outs["noskip", "b"])
    assert not torch.allclose(outs["full", "a"], outs["full", "b"], atol=1e-4)


def test_speed_sweep_euler_step_gives_exactly_the_stated_solver_steps():
    from tasks.acssm.speed import euler_step

    for horizon, steps in ((4.95, 100), (4.95, 200), (5.0, 50), (3.3, 7)):
        model = TorchsdeLatentSDE(3, 2, width=8, state_dim=4, dt=euler_step(horizon, steps))
        calls = []
        f = model.sde.f
        model.sde.f = lambda t, y: calls.append(float(t)) or f(t, y)
        times = torch.linspace(horizon / 10, horizon, 10)[None]
        model(times, torch.randn(1, 10, 3), torch.ones(1, 10, 3))
        assert len(calls) == steps + 1, (horizon, steps, len(calls))   # + torchsde's one shape check at t0


# --------------------------------------------------------------------------------------------------
# the conv encoder of image observations (paper-scale pendulum frames)
# --------------------------------------------------------------------------------------------------
def _frames(B=2, K=5, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(B, K, generator=g) * 0.5 + 0.05, dim=1)
    values = torch.rand(B, K, math.prod(shape), generator=g)              # flattened channels-first frames
    mask = (torch.rand(B, K, 1, generator=g) > 0.3).float().expand(-1, -1, values.shape[-1]).contiguous()
    mask[:, 0] = 1.0
    return times, values, mask


@pytest.mark.parametrize("cls", [ACSSM, TorchsdeLatentSDE])
def test_conv_encoder_on_tiny_images_shapes_and_gradients(cls):
    from models.acssm.networks import ConvEmbedding

    torch.manual_seed(9)
    shape = (2, 6, 7)                                                      # C, H, W: 2 channels, not square
    model = cls(obs_dim=math.prod(shape), out_dim=2, width=8, state_dim=4, image_shape=shape)
    assert isinstance(model.encoder.embed, ConvEmbedding)
    times, values, mask = _frames(shape=shape)
    out = model(times, values, mask, n_samples=3)
    assert out["pred"].shape == (3, 2, 5, 2)
    z, u = model.encoder(times, values, mask, out["valid"])
    assert z.shape == u.shape == (2, 5, 8)
    target = torch.randn(2, 5, 2)
    loss, _ = model.loss(out, target, torch.ones_like(target), LossWeights(1e-6, 1e-8))
    loss.backward()
    for conv in (model.encoder.embed.conv[0], model.encoder.embed.conv[3]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # a frame's pixels reach the encoder only where observed: masked frames are ignored (NaN included)
    junk = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    with torch.no_grad():
        a, _ = model.encoder(times, values, mask, out["valid"])
        b, _ = model.encoder(times, junk, mask, out["valid"])
    assert torch.allclose(a, b, atol=1e-6)


def test_conv_encoder_is_chosen_by_the_encoder_param_for_images_only():
    from models.acssm.fit import build_model
    from models.acssm.networks import ConvEmbedding

    cfg = dict(width=8, state_dim=4, num_basis=2, n_layers=1, n_heads=1, dropout=0.0, time_scale=1.0,
               init_sigma=1.0, skip=True, sde_dt=0.1, obs_var=0.01, encoder="cnn")
    image = build_model("acssm", "regression", 64, 2, cfg, causal=False, image_shape=(1, 8, 8))
    vector = build_model("acssm", "regression", 64, 2, cfg, causal=False, image_shape=None)
    flat = build_model("acssm", "regression", 64, 2, {**cfg, "encoder": "mlp"}, causal=False, image_shape=(1, 8, 8))
    assert isinstance(image.encoder.embed, ConvEmbedding)
    assert not isinstance(vector.encoder.embed, ConvEmbedding) and not isinstance(flat.encoder.embed, ConvEmbedding)
    with pytest.raises(ValueError, match="does not hold obs_dim"):
        build_model("acssm", "regression", 60, 2, cfg, causal=False, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="encoder must be"):
        build_model("acssm", "regression", 64, 2, {**cfg, "encoder": "rnn"}, causal=False)
