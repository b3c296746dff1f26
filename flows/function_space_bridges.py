"""Prefect flow of DBFS (diffusion bridges in function space): prepare -> bridge, posterior -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="function_space_bridges", log_prints=True)
def function_space_bridges(stages: list[str] | None = None,
                           scale: Literal["smoke", "cpu", "paper"] = "cpu",
                           overrides: list[str] | None = None,
                           executor: Literal["local", "pools"] = "local") -> dict:
    """Diffusion bridges between function distributions by stochastic optimal control, resolution-free.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, bridge, posterior, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline: GP paths <-> densities, digits 0-4 <->
            5-9, GP posteriors) or 'paper' (two local image folders at 32x32, the paper's operator size).
        overrides: params.yaml overrides as key=value, e.g.
            ["function_space_bridges.bridge.images.steps_per_iteration=500"]; a run with overrides or a
            non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("function_space_bridges", stages, scale, overrides, executor)
