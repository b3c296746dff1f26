"""Prefect flow of Modular LoRA (safety alignment backfires): prepare -> pretrain -> safety -> finetune -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="modular_lora", log_prints=True)
def modular_lora(stages: list[str] | None = None,
                 scale: Literal["smoke", "cpu", "paper"] = "cpu",
                 overrides: list[str] | None = None,
                 executor: Literal["local", "pools"] = "local") -> dict:
    """Does a safety LoRA survive benign fine-tuning? Full FT and LoRA-on-safe vs Modular LoRA.

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, pretrain, safety, finetune,
            evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline digits) or 'paper'.
        overrides: params.yaml overrides as key=value, e.g. ["modular_lora.safety.objectives=[esd]"].
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag
            limit); 'pools' sends each stage to the `cpu` or `gpu` work pool.
    """
    return run_paper("modular_lora", stages, scale, overrides, executor)
