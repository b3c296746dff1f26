"""The platform: stage registry, params validation, StageContext, atomic outputs, MLflow tracking.

Names are imported on first use (PEP 562), so ``python -m tasks`` and the stage server's client start
without loading pydantic, torch or MLflow.
"""
from __future__ import annotations

import importlib

_HOME = {
    "MissingInputError": "errors", "ParamsError": "errors", "UnknownPaperError": "errors",
    "UnknownStageError": "errors", "UserError": "errors", "Params": "params", "Stage": "registry",
    "get_paper": "registry", "get_stage": "registry", "load_all": "registry", "papers": "registry",
    "stage": "registry", "stage_order": "registry", "StageContext": "context", "run_stage": "context",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
