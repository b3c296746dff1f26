"""VP G-CNN's parts against their equations: exact rotation invariance / equivariance, the theta sampler and its
reparametrisation gradient, the KL term, hue shifts as channel permutations, masked batch norm, the keep
distributions of the colour layers."""
import math

import numpy as np
import pytest
import torch

from models.vp_gcnn import colour as C
from models.vp_gcnn import rotation as R
from models.vp_gcnn.layers import MaskedBatchNorm
from models.vp_gcnn.train import invariance_error


def rotation_net(kind, n=8, seed=0):
    torch.manual_seed(seed)
    return R.RotationNet(kind, n, 4, 8, 5, 3, 2, 0.9).eval()


def test_gcnn_is_invariant_to_exact_quarter_and_half_turns():
    x = torch.rand(6, 1, 16, 16)
    x[:, :, :8, :5] += 2.0  # an asymmetric blob
    net = rotation_net("gcnn")
    net.train()
    net(x)  # some batch-norm statistics
    gcnn_error = invariance_error(net, x)
    assert gcnn_error < 1e-5
    cnn = rotation_net("cnn")
    cnn.train()
    cnn(x)
    assert invariance_error(cnn, x) > 100 * max(gcnn_error, 1e-7)  # a CNN is not invariant


def test_lifting_layer_is_equivariant_to_quarter_turns():
    """lift(rot90 x)_u = rot90(lift(x)_{u - 90 deg}): rotating the image cyclically shifts the rotation axis."""
    torch.manual_seed(0)
    lift = R.LiftingConv(1, 3, 5, 8)
    n = 8
    u, _ = R.stratified_angles(torch.ones(1), n, torch.zeros(1))
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        out = lift(x, u)
        turned = lift(torch.rot90(x, 1, dims=(-2, -1)), u)
    expected = torch.rot90(out, 1, dims=(-2, -1))
    errors = {s: float((turned - torch.roll(expected, s, dims=2)).abs().max()) for s in range(n)}
    best = min(errors, key=errors.get)
    assert errors[best] < 1e-5 and best in (n // 4, n - n // 4)
    assert sorted(errors.values())[1] > 1e-2  # only that shift matches


def test_theta_sampler_range_strata_and_mask():
    theta = torch.tensor([1.0, 0.5, 0.26, 0.01])
    offset = torch.rand(4)
    u, mask = R.stratified_angles(theta, 8, offset)
    n = mask.sum(1)
    assert n.tolist() == [8, 4, 3, 1]  # ceil(N theta)
    for b in range(4):
        kept = u[b, : int(n[b])]
        assert (kept.abs() <= math.pi * theta[b] + 1e-6).all()
        width = 2 * math.pi * theta[b] / n[b]  # one point per stratum of this width
        strata = torch.floor((kept + math.pi * theta[b]) / width)
        assert strata.tolist() == list(range(int(n[b])))
    full, _ = R.stratified_angles(torch.ones(1), 8, torch.zeros(1))
    assert torch.allclose(full[0], -math.pi + 2 * math.pi * torch.arange(8) / 8)  # exact C_8 at evaluation


def test_theta_reparametrisation_gradient():
    """u = pi theta (-1 + 2 (i + offset) / n): du/dtheta = u / theta, and the loss reaches theta through it."""
    theta = torch.tensor([0.5], requires_grad=True)
    u, mask = R.stratified_angles(theta, 8, torch.tensor([0.3]))
    (u * mask).sum().backward()
    assert torch.allclose(theta.grad, (u * mask).sum().detach() / 0.5)
    net = rotation_net("vp")
    net.train()
    x = torch.rand(4, 1, 16, 16)
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert any(e.net[2].bias.grad.abs().item() > 0 for e in net.encoders)


def test_kl_term_is_minus_log_theta():
    """KL(U[-pi theta, pi theta] || U[-pi, pi]) = -H(q) - E_q log p = -log theta, and the net sums it over
    layers."""
    from scipy import stats

    theta = 0.3
    q = stats.uniform(-math.pi * theta, 2 * math.pi * theta)
    u = q.rvs(size=1000, random_state=0)
    cross = -np.mean(stats.uniform(-math.pi, 2 * math.pi).logpdf(u))  # E_q[-log p]
    assert cross - q.entropy() == pytest.approx(-math.log(theta), rel=1e-9)
    net = rotation_net("vp")
    net.train()
    net(torch.rand(5, 1, 16, 16))
    expected = sum(-torch.log(t).mean() for t in net.thetas)
    assert torch.allclose(net.kl, expected)
    assert net.kl.item() == pytest.approx(-2 * math.log(0.9), rel=1e-4)  # both layers start at theta_init


def test_theta_stays_inside_the_unit_interval():
    """The sigmoid parametrisation: theta never reaches 1, so the KL keeps a gradient (the theta = 1 trap)."""
    enc = R.ThetaEncoder(4, 0.9)
    with torch.no_grad():
        enc.net[2].bias.fill_(50.0)
    f = torch.rand(3, 4, 8, 5, 5, requires_grad=False)
    theta = enc(f, torch.ones(3, 8))
    assert (theta <= 1).all() and (theta > 0).all()
    enc2 = R.ThetaEncoder(4, 0.9)
    (-torch.log(enc2(f, torch.ones(3, 8))).mean()).backward()
    assert enc2.net[2].bias.grad.item() < 0  # descending the KL raises theta


def test_hue_shift_is_an_exact_channel_permutation():
    h = C.hue_matrix(2 * math.pi / 3)
    assert torch.allclose(h, torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), atol=1e-6)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    green = C.hue_shift(red, 1, 3)
    assert torch.allclose(green[:, 1], torch.ones(1, 4, 4), atol=1e-6) and green[:, [0, 2]].abs().max() < 1e-6
    grey = torch.full((1, 3, 4, 4), 0.4)
    assert torch.allclose(C.hue_shift(grey, 1, 3), grey, atol=1e-6)


def test_hue_lifting_and_group_conv_are_equivariant():
    torch.manual_seed(0)
    lift, conv = C.HueLiftingConv(4, 3, 3), C.HueGroupConv(4, 5, 3, 3)
    x = torch.rand(2, 3, 8, 8)
    ones = torch.ones(2, 3)
    f, g = lift(x), lift(C.hue_shift(x, 1, 3))
    assert torch.allclose(g, torch.roll(f, -1, dims=2), atol=1e-5)
    assert torch.allclose(conv(g, ones), torch.roll(conv(f, ones), -1, dims=2), atol=1e-5)


def test_masked_batch_norm_skips_masked_elements():
    torch.manual_seed(0)
    f = torch.randn(4, 3, 5, 2, 2)
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 4, dtype=torch.float32)
    bn = MaskedBatchNorm(3)
    bn.train()
    out = bn(f * mask[:, None, :, None, None] + 100 * (1 - mask[:, None, :, None, None]), mask)
    assert out[:, :, 2:].abs().max() == 0  # masked elements stay zero, and their values (100) did not leak
    ref = torch.nn.functional.batch_norm(f[:, :, :2].transpose(1, 2).reshape(-1, 3, 2, 2), None, None,
                                         training=True)
    assert torch.allclose(out[:, :, :2].transpose(1, 2).reshape(-1, 3, 2, 2), ref, atol=1e-5)


def test_vp_colour_keeps_all_shifts_at_high_temperature_and_only_identity_at_low():
    enc = C.GroupEncoder(4, 1)
    keep = C.KeepDistribution("vp", 3, enc, 6.0, 0.9)
    f, m = torch.rand(2, 4, 3, 5, 5), torch.ones(2, 3)
    for bias, expected in ((20.0, [1.0, 1.0, 1.0]), (-20.0, [1.0, 0.0, 0.0])):
        with torch.no_grad():
            enc.out.bias.fill_(bias)
        mask, reg, pi = keep((f, m), 2)
        assert mask.detach()[0].tolist() == expected
    with torch.no_grad():
        enc.out.bias.fill_(0.0)
    mask, reg, pi = keep((f, m), 2)
    (mask.sum() + reg.sum()).backward()  # straight-through: the hard mask carries pi's gradient
    assert enc.out.bias.grad is not None and enc.out.bias.grad.abs().item() > 0


@pytest.mark.parametrize("kind", C.KINDS)
def test_colour_nets_run_and_report_kept_fractions(kind):
    torch.manual_seed(0)
    net = C.ColourNet(kind, 3, 4, 3, 3, 5, 4, 0.9)
    net.train()
    out = net(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 5) and net.kept.shape == (3, 3)
    assert ((net.kept > 0) & (net.kept <= 1)).all()
    if kind in ("cnn", "ce"):
        assert (net.kept == 1).all() and net.regulariser().item() == 0
