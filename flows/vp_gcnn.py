"""Prefect flow of VP G-CNN (input-aware partial equivariance): prepare -> train -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="vp_gcnn", log_prints=True)
def vp_gcnn(stages: list[str] | None = None,
            scale: Literal["smoke", "cpu", "paper"] = "cpu",
            overrides: list[str] | None = None,
            executor: Literal["local", "pools"] = "local") -> dict:
    """VP G-CNN against CNN, G-CNN and Partial G-CNN on Digits67-180, its rotated variant and ColorDigits-LT.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, train, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline) or 'paper' (MNIST-size digits from a
            local image folder, the paper's group sizes and epochs; the train stage is GPU-tagged).
        overrides: params.yaml overrides as key=value, e.g. ["vp_gcnn.train.rotation.epochs=40"];
            a run with overrides or a non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("vp_gcnn", stages, scale, overrides, executor)
