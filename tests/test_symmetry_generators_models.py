"""The KdV solver, the validity score and the orthonormal generators, checked against the equations."""
import numpy as np
import pytest
import torch

from models.symmetry_generators import generators as G
from models.symmetry_generators import kdv
from models.symmetry_generators import validity as V

L, NX = 64.0, 128


@pytest.fixture(scope="module")
def solution():
    u0 = kdv.lpsda_initial_conditions(np.random.default_rng(0), 4, NX, L)
    times, u = kdv.solve_kdv(u0, L, 0.01, 20.0, 0.25, 10.0)
    grid = V.Grid(L, 20.0, 0.3463, L / NX, 0.25)
    return torch.tensor(u), torch.tensor(times), grid


def patches(solution, n=4, size=16, seed=0):
    u, times, grid = solution
    g = torch.Generator().manual_seed(seed)
    return V.patch_points(u[torch.randint(0, len(u), (n,), generator=g)], times, grid,
                          torch.randint(0, u.shape[1] - size, (n,), generator=g),
                          torch.randint(0, NX, (n,), generator=g), size, size)


def test_soliton_moves_at_its_speed():
    x = np.arange(NX) * L / NX
    speed = 0.5
    _, u = kdv.solve_kdv(kdv.soliton(x, 0, speed, 20.0, L), L, 0.01, 10.0, 0.25)
    assert np.abs(u[0, -1] - kdv.soliton(x, 10.0, speed, 20.0, L)).max() < 1e-5
    peak = x[np.argmax(u[0, -1])]
    assert abs(peak - (20.0 + speed * 10.0)) <= L / NX


def test_mass_and_energy_are_conserved_to_solver_accuracy(solution):
    u = solution[0].numpy()
    assert np.abs(kdv.mass(u) - kdv.mass(u[:, :1])).max() < 1e-12
    assert np.abs(kdv.energy(u) - kdv.energy(u[:, :1])).max() < 1e-6
    assert np.isfinite(u).all() and np.abs(u).max() < 10  # the full-circle contour average is stable


def test_half_circle_real_part_contour_is_wrong_for_the_imaginary_kdv_operator():
    """The textbook shortcut (half circle, real part) gives a real Q for an imaginary operator."""
    k = kdv.wavenumbers(NX, L)
    full = kdv.etdrk4_coefficients(1j * k ** 3, 0.01)["Q"]
    exact = (np.exp(0.01 * 1j * k[1:] ** 3 / 2) - 1) / (1j * k[1:] ** 3)   # h * phi_1(hL/2)/2 by hand
    assert np.allclose(full[1:], exact, atol=1e-10)
    assert np.abs(full.imag).max() > 1e-6


def test_rk4_flow_of_a_translation_field_is_a_shift():
    field = V.known_fields(V.Grid(L, 20.0, 0.3463, 0.5, 0.25))["x_translation"]
    points = torch.rand(50, 3, dtype=torch.float64)
    moved = V.rk4_flow(field, points, 0.37, 4)
    assert torch.allclose(moved, points + torch.tensor([0.37, 0.0, 0.0], dtype=torch.float64))


def test_validity_is_invariant_to_known_symmetries_and_rises_for_random_fields(solution):
    grid = solution[2]
    points = patches(solution)
    floor = float(V.validity(points, grid))
    flat = points.reshape(-1, 3)
    for name, tol in (("x_translation", 1e-6), ("t_translation", 1e-6), ("galilean_boost", 0.5)):
        field = V.normalised(V.known_fields(grid)[name], flat)
        for s in (-0.4, 0.4):  # translations: exactly; the boost shears the stencil (fit error only)
            assert abs(float(V.flowed_validity(field, points, grid, s, 8)) - floor) < tol, (name, s)
    torch.manual_seed(0)
    for _ in range(3):
        net = G.GeneratorNet(1, 32, 16).double()
        field = V.normalised(net.field(0), flat)
        assert float(V.flowed_validity(field, points, grid, 0.4, 8)) > floor + 1.5
    u_shift = V.normalised(lambda p: torch.stack([0 * p[..., 0], 0 * p[..., 0], 1 + 0 * p[..., 0]], -1), flat)
    assert float(V.flowed_validity(u_shift, points, grid, 0.4, 8)) > floor + 1.5  # not a KdV symmetry


def test_local_fit_recovers_derivatives_of_a_polynomial():
    grid = V.Grid(10.0, 1.0, 1.0, 0.1, 0.05)
    x = torch.arange(9, dtype=torch.float64) * 0.1
    t = torch.arange(9, dtype=torch.float64) * 0.05
    tt, xx = torch.meshgrid(t, x, indexing="ij")
    u = 1 + 2 * xx + 0.5 * xx ** 3 - 3 * tt
    points = torch.stack([xx / 10.0, tt, u], -1)[None]
    d = V.local_derivatives(points, grid)
    x0 = xx[2:-2, 2:-2]
    assert torch.allclose(d["u_x"][0], 2 + 1.5 * x0 ** 2, atol=1e-8)
    assert torch.allclose(d["u_xxx"][0], torch.full_like(x0, 3.0), atol=1e-6)
    assert torch.allclose(d["u_t"][0], torch.full_like(x0, -3.0), atol=1e-8)


def test_orthonormaliser_gives_uncorrelated_unit_heads():
    torch.manual_seed(0)
    net = G.GeneratorNet(4, 32, 16).double()
    points = torch.rand(2000, 3, dtype=torch.float64)
    mix = G.orthonormaliser(net.raw(points))
    fields = [net.field(i, mix) for i in range(4)]
    corr = G.correlation_matrix(fields, points)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 1e-3
    norms = [float(V.inner(f(points), f(points))) for f in fields]
    assert np.allclose(norms, 1.0, atol=1e-4)


def test_generator_fields_are_periodic_in_x():
    net = G.GeneratorNet(2, 16, 8).double()
    p = torch.rand(10, 3, dtype=torch.float64)
    assert torch.allclose(net.raw(p), net.raw(p + torch.tensor([1.0, 0, 0], dtype=torch.float64)), atol=1e-10)


def test_span_correlation_of_a_field_in_the_span_is_one(solution):
    grid = solution[2]
    points = patches(solution)
    known = V.known_fields(grid)
    mixed = lambda p: 0.6 * known["x_translation"](p) + 0.8 * known["t_translation"](p)
    assert G.span_correlation(mixed, [known["x_translation"], known["t_translation"]], points) > 0.999
    assert G.span_correlation(known["t_translation"], [known["x_translation"]], points) < 1e-6


def test_a_training_step_lowers_nothing_to_nan(solution):
    grid = solution[2]
    net = G.GeneratorNet(2, 16, 8).double()
    cfg = G.TrainConfig(3, 1e-3, 0.4, 2, 1.0, 3.0, 1e-4, 1.0, 0.5)
    gen = torch.Generator().manual_seed(0)
    G.fit_generators(net, lambda g: patches(solution, 1, 12), patches(solution, 2, 12), grid, cfg, gen)
    assert torch.isfinite(net.mix).all()
    corr = G.correlation_matrix([net.field(0), net.field(1)], patches(solution, 2, 12))
    assert abs(float(corr[0, 1])) < 1e-6
