"""Prefect flow of L2E (learning to explore for SGMCMC): prepare -> metatrain -> sample -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="l2e_sgmcmc", log_prints=True)
def l2e_sgmcmc(stages: list[str] | None = None,
               scale: Literal["smoke", "cpu", "paper"] = "cpu",
               overrides: list[str] | None = None,
               executor: Literal["local", "pools"] = "local") -> dict:
    """A meta-learned SGMCMC sampler (L2E) against tuned cyclical SGHMC and deep ensembles on unseen tasks.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, metatrain, sample, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline scikit-learn tasks) or 'paper'
            (the 120-family meta-training grid and ResNet20-FRN on CIFAR from local files; GPU).
        overrides: params.yaml overrides as key=value, e.g. ["l2e_sgmcmc.metatrain.iterations=200"];
            a run with overrides or a non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("l2e_sgmcmc", stages, scale, overrides, executor)
