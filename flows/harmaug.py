"""Prefect flow of HarmAug: prepare -> pretrain -> augment -> finetune -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="harmaug", log_prints=True)
def harmaug(stages: list[str] | None = None,
            scale: Literal["smoke", "cpu", "paper"] = "cpu",
            overrides: list[str] | None = None,
            executor: Literal["local", "pools"] = "local") -> dict:
    """HarmAug: a safety-aligned generator jailbroken by an affirmative prefix writes harmful instructions
    (abstract tokens at CPU scale), a teacher guard labels them, and a small student is distilled.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, pretrain, augment, finetune,
            evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline, symbolic harm world) or 'paper'
            (local generator, response model, Llama-Guard-style teacher, DeBERTa student and data).
        overrides: params.yaml overrides as key=value, e.g. ["harmaug.finetune.steps=800"]; a run with
            overrides or a non-default scale is saved as a DVC experiment.
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag limit);
            'pools' sends each stage to the `cpu` or `gpu` work pool (deployment `dvc-stage/<pool>`).
    """
    return run_paper("harmaug", stages, scale, overrides, executor)
