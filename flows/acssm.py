"""Prefect flow of ACSSM (amortized control of continuous state space models): prepare -> finetune, speed,
ablation -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="acssm", log_prints=True)
def acssm(stages: list[str] | None = None,
          scale: Literal["smoke", "cpu", "paper"] = "cpu",
          overrides: list[str] | None = None,
          executor: Literal["local", "pools"] = "local") -> dict:
    """Simulation-free latent SDE (closed-form moments + parallel scan) with an amortized control, on
    irregular series: per-time-point classification, regression, interpolation and extrapolation.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, ablation, finetune, speed,
            evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline) or 'paper' (local data sets).
        overrides: params.yaml overrides as key=value, e.g. ["acssm.finetune.epochs=30"].
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag
            limit); 'pools' sends each stage to the `cpu` or `gpu` work pool.
    """
    return run_paper("acssm", stages, scale, overrides, executor)
