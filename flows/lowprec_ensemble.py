"""Prefect flow of Ex Uno Pluria (LPE-BSR): prepare -> train -> ensemble -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="lowprec_ensemble", log_prints=True)
def lowprec_ensemble(stages: list[str] | None = None,
                     scale: Literal["smoke", "cpu", "paper"] = "cpu",
                     overrides: list[str] | None = None,
                     executor: Literal["local", "pools"] = "local") -> dict:
    """Training-free ensembles from one model by Bernoulli stochastic rounding to INT-b grids.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, train, ensemble, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline) or 'paper' (ViT from local folders).
        overrides: params.yaml overrides as key=value, e.g. ["lowprec_ensemble.ensemble.bits=[3,4]"];
            a run with overrides or a non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("lowprec_ensemble", stages, scale, overrides, executor)
