"""Prefect flow of ASE (early exiting in a diffusion transformer): prepare -> pretrain -> finetune -> evaluate."""
from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.core import run_paper


@flow(name="early_exit_diffusion", log_prints=True)
def early_exit_diffusion(stages: list[str] | None = None,
                         scale: Literal["smoke", "cpu", "paper"] = "cpu",
                         overrides: list[str] | None = None,
                         executor: Literal["local", "pools"] = "local") -> dict:
    """Time-dependent early exiting in a DiT for faster sampling at equal quality (DDPM, DDIM, DPM-Solver).

    Args:
        stages: stages to run, in pipeline order (default: all of prepare, pretrain, finetune, evaluate).
        scale: 'smoke' (seconds), 'cpu' (default, minutes, offline) or 'paper' (DiT-XL/2 from a local folder).
        overrides: params.yaml overrides as key=value, e.g.
            ["early_exit_diffusion.finetune.schedule=[6,6,5,5,4,4,3,3,3,3]"].
        executor: 'local' runs every stage in this flow run (GPU stages under the `gpu` tag
            limit); 'pools' sends each stage to the `cpu` or `gpu` work pool.
    """
    return run_paper("early_exit_diffusion", stages, scale, overrides, executor)
