"""The stage registry: ``@stage(paper, name, params=..., inputs=..., gpu=...)``.

A stage is a plain function ``fn(ctx, params) -> None``. DVC (via ``python -m tasks run``), Prefect
(via ``dvc repro --single-item``) and tests all reach the same function through this registry.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel

from .errors import UnknownPaperError, UnknownStageError

# Paper modules under tasks/ that define stages. A new paper adds its id here.
PAPER_MODULES = (
    "lowprec_ensemble",
    "bo_fusion",
    "acssm",
    "early_exit_diffusion",
    "modular_lora",
)


@dataclass(frozen=True)
class Stage:
    paper: str
    name: str
    fn: Callable
    params: type[BaseModel]
    inputs: tuple[str, ...] = ()
    gpu: bool = False
    description: str = ""
    writes_results: bool = False

    @property
    def dvc_name(self) -> str:
        return f"{self.paper}-{self.name}"


_REGISTRY: dict[str, dict[str, Stage]] = {}
_loaded = False


def stage(paper: str, name: str, *, params: type[BaseModel], inputs: tuple[str, ...] | list[str] = (),
          gpu: bool = False, writes_results: bool | None = None):
    """Register ``fn`` as stage ``name`` of ``paper``.

    ``params`` validates ``params.yaml[paper][name]``; ``inputs`` names upstream stages of the same paper
    whose output folders the stage reads; ``gpu`` tags its Prefect task ``gpu``. The terminal stage
    ``evaluate`` writes ``results/<paper>/`` (``writes_results`` defaults to ``name == "evaluate"``).
    """

    def register(fn: Callable) -> Callable:
        stages = _REGISTRY.setdefault(paper, {})
        if name in stages and stages[name].fn is not fn:
            raise ValueError(f"stage {paper}.{name} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        stages[name] = Stage(paper, name, fn, params, tuple(inputs), gpu, doc[0] if doc else "",
                             name == "evaluate" if writes_results is None else writes_results)
        return fn

    return register


def load_all() -> dict[str, dict[str, Stage]]:
    """Import every paper module so its stages register; returns the registry."""
    global _loaded
    if not _loaded:
        for module in PAPER_MODULES:
            try:
                importlib.import_module(f"tasks.{module}")
            except ModuleNotFoundError as exc:
                if exc.name != f"tasks.{module}":
                    raise
        _loaded = True
    return _REGISTRY


def papers() -> list[str]:
    return sorted(load_all())


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def get_paper(paper: str) -> dict[str, Stage]:
    registry = load_all()
    if paper not in registry:
        raise UnknownPaperError(
            f"Unknown paper '{paper}'.{_suggest(paper, list(registry))} Registered papers: "
            f"{', '.join(sorted(registry))}. List them with `python -m tasks --help`.")
    return registry[paper]


def get_stage(paper: str, name: str) -> Stage:
    stages = get_paper(paper)
    if name not in stages:
        raise UnknownStageError(
            f"Unknown stage '{name}' of paper '{paper}'.{_suggest(name, list(stages))} Its stages: "
            f"{', '.join(stages)}. List them with `python -m tasks list {paper}`.")
    return stages[name]


def stage_order(paper: str) -> list[Stage]:
    """The paper's stages in dependency order (inputs first), ties in registration order."""
    stages = get_paper(paper)
    done: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in trail:
            raise ValueError(f"cycle in stage inputs of {paper}: {' -> '.join(trail + (name,))}")
        for dep in stages[name].inputs:
            visit(dep, trail + (name,))
        done.append(name)

    for name in stages:
        visit(name, ())
    return [stages[n] for n in done]
