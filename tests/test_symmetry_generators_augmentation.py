"""The FNO and the Lie point symmetry augmentation (resampling of flowed trajectories), checked against
the equations: shapes, truncated modes, exact shifts, a known-symmetry copy keeps the KdV residual."""
import numpy as np
import pytest
import torch

from models.symmetry_generators import augmentation as A
from models.symmetry_generators import fno as F
from models.symmetry_generators import generators as G
from models.symmetry_generators import kdv
from models.symmetry_generators import validity as V

L, NX = 64.0, 128


@pytest.fixture(scope="module")
def solution():
    u0 = kdv.lpsda_initial_conditions(np.random.default_rng(1), 3, NX, L)
    times, u = kdv.solve_kdv(u0, L, 0.01, 20.0, 0.25, 10.0)
    grid = V.Grid(L, 20.0, 0.3463, L / NX, 0.25)
    return torch.tensor(u), torch.tensor(times), grid


def score(u, times, grid):
    """The validity score over every interior point of whole trajectories."""
    return float(V.validity(A.trajectory_points(u, times, grid), grid))


def test_fno_shapes_and_rollout():
    model = F.FNO1d(time_history=6, time_future=4, width=8, modes=5, layers=2)
    assert model(torch.randn(3, 6, 32)).shape == (3, 4, 32)
    u = torch.randn(2, 6 + 4 * 3 + 2, 32)
    assert F.rollout(model, u).shape == (2, 12, 32)          # three whole chunks, the last 2 frames unused
    nmse = F.rollout_nmse(model, u)
    assert nmse.shape == (2,) and torch.isfinite(nmse).all() and (nmse > 0).all()


def test_spectral_conv_keeps_only_the_lowest_modes():
    conv = F.SpectralConv1d(channels=2, modes=4)
    x = torch.arange(32) * 2 * torch.pi / 32
    high = torch.stack([torch.sin(6 * x), torch.cos(9 * x)])[None]   # wavenumbers 6 and 9 >= 4
    assert conv(high).abs().max() < 1e-5
    low = torch.stack([torch.sin(2 * x), torch.cos(3 * x)])[None]
    assert conv(low).abs().max() > 1e-3


def test_fno_training_lowers_the_loss(solution):
    u, times, _ = solution
    torch.manual_seed(0)
    model = F.FNO1d(4, 4, 16, 8, 2)
    losses = []
    pool = u.float()[:, None]
    valid = torch.ones(len(u), 1, u.shape[1], dtype=torch.bool)
    F.train_fno(model, pool, valid, 60, 8, 3e-3, 1.0, torch.Generator().manual_seed(0),
                on_step=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_dirichlet_resampling_of_an_x_shift_is_the_exact_spectral_shift(solution):
    u, times, grid = solution
    points = A.trajectory_points(u[:1], times, grid)[0]
    shift = 0.123                                           # a fraction of the domain, not a grid multiple
    moved = points + torch.tensor([shift, 0.0, 0.0], dtype=points.dtype)
    new_u, rows = A.resample(moved, times, grid)
    k = 2 * np.pi * np.fft.rfftfreq(NX, d=L / NX)
    exact = np.fft.irfft(np.fft.rfft(u[0].numpy()) * np.exp(-1j * k * shift * L), n=NX)
    assert bool(rows.all())
    assert np.abs(new_u.numpy() - exact).max() < 1e-6


def test_known_symmetry_copies_preserve_the_kdv_residual_and_random_fields_do_not(solution):
    u, times, grid = solution
    floor = score(u, times, grid)
    flat = A.trajectory_points(u, times, grid).reshape(-1, 3)
    known = V.known_fields(grid)
    for name in ("x_translation", "galilean_boost"):   # exact shifts in x at fixed t: no t-interpolation
        make = A.linear_combination([V.normalised(known[name], flat)])
        copies, valid, rejected = A.lps_copies(u, times, grid, make, torch.tensor([0.1]), 2, 4,
                                               torch.Generator().manual_seed(0), 20)
        assert rejected == 0 and bool(valid.all())
        assert not torch.allclose(copies[:, 0], u)       # a real transformation
        assert abs(score(copies[:, 0], times, grid) - floor) < 0.1, name
    torch.manual_seed(0)
    net = G.GeneratorNet(1, 32, 16).double()
    make = A.linear_combination([V.normalised(net.field(0), flat)])
    copies, valid, rejected = A.lps_copies(u, times, grid, make, torch.tensor([0.3]), 1, 4,
                                           torch.Generator().manual_seed(0), 20)
    rows = valid[:, 0].all(dim=0)
    assert score(copies[:, 0][:, rows], times[rows], grid) > floor + 1.0


def test_the_boost_copy_is_the_closed_form_boost(solution):
    """u~(x, t) = u(x - e t, t) + e: the Galilean boost of KdV."""
    u, times, grid = solution
    boost = V.known_fields(grid)["galilean_boost"]         # (T t_end / L, 0, u_scale): e = 1 per unit s
    e = 0.05
    copies, valid, _ = A.lps_copies(u[:1], times, grid, A.linear_combination([boost]), torch.tensor([e]), 1,
                                    4, torch.Generator().manual_seed(3), 20)
    alpha = (2 * torch.rand(1, generator=torch.Generator().manual_seed(3), dtype=u.dtype) - 1) * e
    k = 2 * np.pi * np.fft.rfftfreq(NX, d=L / NX)
    shift = alpha.item() * times.numpy()[:, None]                              # x shift e t per frame
    exact = np.fft.irfft(np.fft.rfft(u[0].numpy()) * np.exp(-1j * k * shift), n=NX) + alpha.item()
    assert np.abs(copies[0, 0].numpy() - exact).max() < 1e-6


def test_a_copy_with_too_few_valid_frames_is_rejected(solution):
    u, times, grid = solution
    t_shift = A.linear_combination([V.known_fields(grid)["t_translation"]])
    copies, valid, rejected = A.lps_copies(u, times, grid, t_shift, torch.tensor([0.9]), 3, 4,
                                           torch.Generator().manual_seed(0), 35)
    assert rejected > 0 and bool(valid.any(dim=-1).all())
    # a rejected copy is the original with every frame valid
    same = [(i, c) for i in range(len(u)) for c in range(3) if torch.equal(copies[i, c], u[i])]
    assert len(same) == rejected and all(bool(valid[i, c].all()) for i, c in same)


def test_valid_starts_need_a_whole_window_of_valid_frames():
    rows = torch.tensor([True, True, False, True, True, True])
    assert F.valid_starts(rows, 3).tolist() == [False, False, False, True]


def test_augmentation_claim_needs_known_augmentation_to_help():
    from tasks.symmetry_generators.augmentation_report import decide_augmentation

    rng = np.random.default_rng(0)
    run = lambda seed, method, level: {"seed": seed, "method": method,
                                       "nmse": (level * np.exp(0.02 * rng.standard_normal(8))).tolist()}
    helps = [run(s, m, v) for s in range(5) for m, v in (("none", 0.6), ("known", 0.3), ("learned", 0.31))]
    claim, regime = decide_augmentation(helps, 0.0, 0.1, 0.0)
    assert regime.passed and claim.verdict is True
    worse = [run(s, m, v) for s in range(5) for m, v in (("none", 0.6), ("known", 0.3), ("learned", 0.5))]
    claim, _ = decide_augmentation(worse, 0.0, 0.1, 0.0)
    assert claim.verdict is False and claim.weakest == "learned_near_known"
    flat = [run(s, m, 0.5) for s in range(5) for m in ("none", "known", "learned")]
    claim, regime = decide_augmentation(flat, 0.0, 0.1, 0.0)
    assert not regime.passed and claim.verdict is None and "known_augmentation_helps" in claim.reason


def test_image_claim_is_null_when_the_score_cannot_see_rotation():
    from tasks.symmetry_generators.image_report import decide_images

    def run(rotation, corr, gain):
        return {"validity": {"rotation": rotation, "scaling": 0.1, "random0": 0.5, "random1": 0.6},
                "correlation": {"learned0": {"rotation": corr, "scaling": 0.1}},
                "accuracy": {"none": 0.8, "affine": 0.85, "learned": 0.8 + gain}}
    claim, separates = decide_images([run(0.1, 0.9, 0.03), run(0.12, 0.92, 0.04), run(0.1, 0.88, 0.05)], 0.8, 0.0)
    assert separates.passed and claim.verdict is True
    claim, separates = decide_images([run(0.9, 0.9, 0.03), run(0.8, 0.92, 0.04)], 0.8, 0.0)
    assert not separates.passed and claim.verdict is None
