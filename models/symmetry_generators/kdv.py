"""KdV u_t + u u_x + u_xxx = 0 on a periodic domain by pseudo-spectral ETDRK4 (Kassam & Trefethen 2005).

In Fourier space (real FFT, wavenumbers k = 2 pi m / L) the equation is  du^/dt = Lin u^ + N(u),
Lin = i k^3 (from -d^3/dx^3) and N(u) = -(i k / 2) FFT(u^2), 2/3-rule dealiased. ETDRK4's phi-function
coefficients are evaluated by a contour average; Lin is purely imaginary, so the average must run over
the FULL circle (the textbook half-circle real-part shortcut only holds for real operators and blows
up here).
"""
from __future__ import annotations

import numpy as np


def wavenumbers(nx: int, length: float) -> np.ndarray:
    return 2 * np.pi * np.fft.rfftfreq(nx, d=length / nx)


def etdrk4_coefficients(lin: np.ndarray, dt: float, contour_points: int = 32) -> dict:
    """E, E2 and the phi-combinations Q, f1, f2, f3 of ETDRK4 for diagonal linear part ``lin``."""
    roots = np.exp(2j * np.pi * (np.arange(1, contour_points + 1) - 0.5) / contour_points)  # full circle
    lr = dt * lin[:, None] + roots[None, :]
    mean = lambda z: z.mean(axis=1)
    return {
        "E": np.exp(dt * lin), "E2": np.exp(dt * lin / 2),
        "Q": dt * mean((np.exp(lr / 2) - 1) / lr),
        "f1": dt * mean((-4 - lr + np.exp(lr) * (4 - 3 * lr + lr ** 2)) / lr ** 3),
        "f2": dt * mean((2 + lr + np.exp(lr) * (-2 + lr)) / lr ** 3),
        "f3": dt * mean((-4 - 3 * lr - lr ** 2 + np.exp(lr) * (4 - lr)) / lr ** 3),
    }


def solve_kdv(u0: np.ndarray, length: float, dt: float, t_end: float, save_every: float,
              t_save_start: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Integrate a batch of initial conditions ``u0`` (batch, nx). Returns (times, u (batch, nt, nx))
    with frames every ``save_every`` from ``t_save_start`` to ``t_end``."""
    u0 = np.atleast_2d(np.asarray(u0, dtype=np.float64))
    nx = u0.shape[1]
    k = wavenumbers(nx, length)
    dealias = np.arange(k.size) < (2 / 3) * (nx // 2)
    odd_k = np.where(np.arange(k.size) == nx // 2, 0.0, k)  # odd derivatives: Nyquist mode zeroed
    c = etdrk4_coefficients(1j * odd_k ** 3, dt)
    g = -0.5j * odd_k * dealias

    def nonlinear(v):
        return g * np.fft.rfft(np.fft.irfft(v, n=nx) ** 2)

    steps_per_save = int(round(save_every / dt))
    n_steps = int(round(t_end / dt))
    first = int(round(t_save_start / dt))
    v = np.fft.rfft(u0)
    frames, times = [], []
    for step in range(n_steps + 1):
        if step >= first and (step - first) % steps_per_save == 0:
            frames.append(np.fft.irfft(v, n=nx))
            times.append(step * dt)
        if step == n_steps:
            break
        nv = nonlinear(v)
        a = c["E2"] * v + c["Q"] * nv
        na = nonlinear(a)
        b = c["E2"] * v + c["Q"] * na
        nb = nonlinear(b)
        cc = c["E2"] * a + c["Q"] * (2 * nb - nv)
        nc = nonlinear(cc)
        v = c["E"] * v + nv * c["f1"] + 2 * (na + nb) * c["f2"] + nc * c["f3"]
    return np.array(times), np.stack(frames, axis=1)


def lpsda_initial_conditions(rng: np.random.Generator, n: int, nx: int, length: float,
                             n_waves: int = 10, l_max: int = 2) -> np.ndarray:
    """u0(x) = sum_j A_j sin(2 pi l_j x / L + phi_j), A ~ U(-.5, .5), l in {1..l_max}, phi ~ U(0, 2 pi)."""
    x = np.arange(nx) * length / nx
    amp = rng.uniform(-0.5, 0.5, (n, n_waves, 1))
    ell = rng.integers(1, l_max + 1, (n, n_waves, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, n_waves, 1))
    return (amp * np.sin(2 * np.pi * ell * x / length + phase)).sum(axis=1)


def soliton(x: np.ndarray, t: float, speed: float, x0: float, length: float) -> np.ndarray:
    """u = 3c sech^2(sqrt(c)/2 (x - c t - x0)), wrapped periodically (exact for a wide domain)."""
    xi = (x - speed * t - x0 + length / 2) % length - length / 2
    return 3 * speed / np.cosh(np.sqrt(speed) / 2 * xi) ** 2


def mass(u: np.ndarray) -> np.ndarray:
    return u.mean(axis=-1)


def energy(u: np.ndarray) -> np.ndarray:
    """The conserved L2 'momentum' mean(u^2)."""
    return (u ** 2).mean(axis=-1)
