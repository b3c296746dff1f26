"""Prefect flow of BOMF (model fusion through Bayesian optimisation): prepare -> hpo -> finetune -> fuse
-> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="bo_fusion", log_prints=True)
def bo_fusion(stages: list[str] | None = None,
              scale: Literal["smoke", "cpu", "paper"] = "cpu",
              overrides: list[str] | None = None,
              executor: Literal["local", "pools"] = "local") -> dict:
    """Fuse fine-tuning checkpoints of a pretrained language model with multi-objective BO (val metric
    and val loss), after a two-stage hyperparameter search on a lightweight proxy.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, hpo, finetune, fuse, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline MiniLM) or 'paper' (RoBERTa / a causal
            LM with LoRA from local folders).
        overrides: params.yaml overrides as key=value, e.g. ["bo_fusion.fuse.n_iterations=20"].
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag
            limit); 'pools' sends each stage to the `cpu` or `gpu` work pool.
    """
    return run_paper("bo_fusion", stages, scale, overrides, executor)
