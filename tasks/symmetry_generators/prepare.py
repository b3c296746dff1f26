"""prepare: KdV trajectories by pseudo-spectral ETDRK4 (CPU) or from local .npz files (paper scale)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError

from .common import DataMeta


class PrepareParams(Params):
    source: Literal["solver", "local"] = Field(description="solver (ETDRK4 here) or local .npz files")
    data_dir: str = Field(description="paper scale: folder with train.npz and test.npz (u, t, x)")
    length: float = Field(gt=0, description="periodic domain length L")
    nx: int = Field(gt=7, description="grid points in x")
    solver_dt: float = Field(gt=0, description="ETDRK4 time step")
    t_end: float = Field(gt=0, description="final time")
    t_save_start: float = Field(ge=0, description="first stored frame (burn-in before it)")
    save_every: float = Field(gt=0, le=0.25, description="frame spacing (<= 0.25, the issue's bound)")
    n_train: int = Field(gt=0)
    n_test: int = Field(gt=0)
    n_waves: int = Field(gt=0, description="sines in the LPSDA initial condition")
    l_max: int = Field(gt=0, description="largest wave number l of the initial condition")
    u_scale: float = Field(gt=0, description="U = u_scale * u in the scaled points (KdV: 0.3463)")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "local" and not self.data_dir:
            raise ValueError("source 'local' needs 'data_dir'")
        if self.t_save_start >= self.t_end:
            raise ValueError("t_save_start must be below t_end")
        return self


def load_local(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(u_train, u_test, t, x) from ``folder/{train,test}.npz`` (arrays u (n, nt, nx), t (nt,), x (nx,))."""
    out = []
    for split in ("train", "test"):
        path = folder / f"{split}.npz"
        if not path.is_file():
            raise MissingInputError(f"'symmetry_generators.prepare.data_dir' has no {split}.npz ({path}); "
                                    f"see docs/symmetry_generators.md for the layout.")
        with np.load(path) as f:
            out.append({k: f[k] for k in ("u", "t", "x")})
    return out[0]["u"], out[1]["u"], out[0]["t"], out[0]["x"]


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """KdV u_t + u u_x + u_xxx = 0: train/test trajectories on a periodic grid, frames <= 0.25 apart."""
    from models.symmetry_generators.kdv import energy, lpsda_initial_conditions, mass, solve_kdv

    if p.source == "local":
        u_train, u_test, times, x = load_local(Path(p.data_dir))
        length = float(x[1] - x[0]) * len(x)
    else:
        rng = np.random.default_rng(ctx.seed)
        u0 = lpsda_initial_conditions(rng, p.n_train + p.n_test, p.nx, p.length, p.n_waves, p.l_max)
        times, u = solve_kdv(u0, p.length, p.solver_dt, p.t_end, p.save_every, p.t_save_start)
        u_train, u_test, length = u[:p.n_train], u[p.n_train:], p.length
    if not (np.isfinite(u_train).all() and np.isfinite(u_test).all()):
        raise RuntimeError("the KdV data are not finite")
    both = np.concatenate([u_train, u_test])
    drift = {"mass": float(np.abs(mass(both) - mass(both[:, :1])).max()),
             "energy": float(np.abs(energy(both) - energy(both[:, :1])).max())}
    ctx.log_metrics({f"{k}_drift": v for k, v in drift.items()})
    io.save_arrays(ctx.out_dir / "data.npz", u_train=u_train.astype(np.float32),
                   u_test=u_test.astype(np.float32), times=np.asarray(times, dtype=np.float64))
    meta = DataMeta(source=p.source, length=length, t_end=float(times[-1]), u_scale=p.u_scale,
                    dx=length / u_train.shape[-1], dt=float(times[1] - times[0]), n_train=len(u_train),
                    n_test=len(u_test), nt=u_train.shape[1], nx=u_train.shape[2])
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump())
    io.write_json(ctx.out_dir / "conservation.json", drift)
