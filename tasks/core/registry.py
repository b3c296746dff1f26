"""The stage registry: a paper is a package ``tasks/<paper>/``, a stage is one module of it.

``tasks/<paper>/<stage>.py`` defines one function decorated with ``@stage(params=..., inputs=..., gpu=...)``;
the paper and stage names come from the module's name, so a module can register only itself. Papers
and stages are discovered (``pkgutil`` over ``tasks/``), never registered by one module importing
another: running a stage imports that stage's module only. A paper package may hold helper modules
(``common.py``, ``data.py``, ...) that register nothing. DVC (via ``python -m tasks run``), Prefect
(via ``dvc repro --single-item``) and tests all reach the same function through this registry.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from .errors import UnknownPaperError, UnknownStageError

PACKAGE = "tasks"
SHARED_PACKAGES = ("core", "data")  # packages of tasks/ that are not papers


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

    @property
    def module(self) -> str:
        return f"{PACKAGE}.{self.paper}.{self.name}"


_REGISTRY: dict[str, dict[str, Stage]] = {}
_complete: set[str] = set()


def _names_of(module: str) -> tuple[str, str]:
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != PACKAGE or parts[1] in SHARED_PACKAGES:
        raise ValueError(f"a stage lives in its own module tasks/<paper>/<stage>.py; '{module}' is not one")
    return parts[1], parts[2]


def stage(*, params: type[BaseModel], inputs: tuple[str, ...] | list[str] = (), gpu: bool = False,
          writes_results: bool | None = None):
    """Register ``fn`` as the stage of its module ``tasks.<paper>.<stage>``.

    ``params`` validates ``params.yaml[paper][stage]``; ``inputs`` names upstream stages of the same
    paper whose output folders the stage reads; ``gpu`` tags its Prefect task ``gpu``. The terminal
    stage ``evaluate`` writes ``results/<paper>/`` (``writes_results`` defaults to ``name == "evaluate"``).
    """

    def register(fn: Callable) -> Callable:
        paper, name = _names_of(fn.__module__)
        stages = _REGISTRY.setdefault(paper, {})
        if name in stages and stages[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"module tasks.{paper}.{name} registers two stages")
        doc = (fn.__doc__ or "").strip().splitlines()
        stages[name] = Stage(paper, name, fn, params, tuple(inputs), gpu, doc[0] if doc else "",
                             name == "evaluate" if writes_results is None else writes_results)
        return fn

    return register


def papers() -> list[str]:
    """Paper ids: the packages under ``tasks/`` (without importing them)."""
    pkg = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if m.ispkg and m.name not in SHARED_PACKAGES and not m.name.startswith("_"))


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_paper(paper: str) -> None:
    known = papers()
    if paper not in known:
        raise UnknownPaperError(
            f"Unknown paper '{paper}'.{_suggest(paper, known)} Registered papers: {', '.join(known)}. "
            f"List them with `python -m tasks --help`.")


def get_paper(paper: str) -> dict[str, Stage]:
    """Every stage of ``paper`` (imports all modules of its package), in dependency order."""
    _check_paper(paper)
    if paper not in _complete:
        pkg = importlib.import_module(f"{PACKAGE}.{paper}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.ispkg and not mod.name.startswith("_"):
                importlib.import_module(f"{PACKAGE}.{paper}.{mod.name}")
        _complete.add(paper)
    stages = _REGISTRY.get(paper, {})
    return {st.name: st for st in _ordered(paper, stages)}


def load_all() -> dict[str, dict[str, Stage]]:
    """Every paper's stages (imports every stage module; for listings and consistency checks)."""
    return {paper: get_paper(paper) for paper in papers()}


def get_stage(paper: str, name: str) -> Stage:
    """Stage ``name`` of ``paper``, importing its module only."""
    _check_paper(paper)
    if name not in _REGISTRY.get(paper, {}) and not name.startswith("_") and name.isidentifier():
        try:
            importlib.import_module(f"{PACKAGE}.{paper}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{PACKAGE}.{paper}.{name}":
                raise
    if name not in _REGISTRY.get(paper, {}):
        stages = list(get_paper(paper))
        raise UnknownStageError(
            f"Unknown stage '{name}' of paper '{paper}'.{_suggest(name, stages)} Its stages: "
            f"{', '.join(stages)}. List them with `python -m tasks list {paper}`.")
    return _REGISTRY[paper][name]


def _ordered(paper: str, stages: dict[str, Stage]) -> list[Stage]:
    done: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in trail:
            raise ValueError(f"cycle in stage inputs of {paper}: {' -> '.join(trail + (name,))}")
        if name not in stages:
            raise ValueError(f"stage {paper}-{trail[-1]} reads '{name}', which is not a stage of {paper}")
        for dep in stages[name].inputs:
            visit(dep, trail + (name,))
        done.append(name)

    for name in sorted(stages):
        visit(name, ())
    return [stages[n] for n in done]


def stage_order(paper: str) -> list[Stage]:
    """The paper's stages in dependency order (inputs first), ties alphabetical."""
    return list(get_paper(paper).values())
