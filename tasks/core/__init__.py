"""The platform: stage registry, params validation, StageContext, atomic outputs, MLflow tracking."""
from .errors import MissingInputError, ParamsError, UnknownPaperError, UnknownStageError, UserError
from .params import Params
from .registry import Stage, get_paper, get_stage, load_all, papers, stage, stage_order
from .context import StageContext, run_stage

__all__ = [
    "MissingInputError", "ParamsError", "Params", "Stage", "StageContext", "UnknownPaperError",
    "UnknownStageError", "UserError", "get_paper", "get_stage", "load_all", "papers", "run_stage",
    "stage", "stage_order",
]
