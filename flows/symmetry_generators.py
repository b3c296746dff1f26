"""Prefect flow of learning infinitesimal generators of symmetries: prepare -> learn_symmetry -> augment ->
evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="symmetry_generators", log_prints=True)
def symmetry_generators(stages: list[str] | None = None,
                        scale: Literal["smoke", "cpu", "paper"] = "cpu",
                        overrides: list[str] | None = None,
                        executor: Literal["local", "pools"] = "local") -> dict:
    """Generators of KdV's continuous symmetries learned from data with a PDE validity score, then used to
    augment a Fourier neural operator's few training trajectories (against known and no augmentation).

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, learn_symmetry, augment,
            evaluate; augment is GPU-tagged).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline) or 'paper' (LPSDA-size KdV from
            local files).
        overrides: params.yaml overrides as key=value, e.g. ["symmetry_generators.learn_symmetry.steps=800"];
            a run with overrides or a non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("symmetry_generators", stages, scale, overrides, executor)
