"""``params.yaml`` loading, scale overrides and pydantic validation per stage section."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ParamsError

SCALES = ("smoke", "cpu", "paper")


class Params(BaseModel):
    """Base of every stage's params: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class GlobalParams(Params):
    seed: int = Field(ge=0, description="base random seed of every stage")
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="'auto' picks CUDA when visible, else CPU; 'cpu', 'cuda' or 'cuda:N'")


def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"Missing parameters file '{path}'. Run from the project root (where "
                          f"params.yaml and dvc.yaml live) or set PAPERFLOWS_ROOT.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"'{path}' is not valid YAML: {exc}. Fix the file and run again.") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"'{path}' must be a mapping of sections, got {type(data).__name__}.")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def scale_overrides(root: Path, scale: str, papers: list[str] | None = None) -> dict:
    """Nested overrides for ``scale`` from ``scales/<scale>.yaml`` (cpu = params.yaml itself)."""
    if scale not in SCALES:
        raise ParamsError(f"Unknown scale '{scale}'. Choose one of {', '.join(SCALES)}.")
    if scale == "cpu":
        return {}
    data = load_yaml(root / "scales" / f"{scale}.yaml")
    if papers is not None:
        data = {k: v for k, v in data.items() if k in papers or k in ("seed", "device")}
    return data


def _format_validation(paper: str, stage: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join([paper, stage, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            lines.append(f"'{key}' is not a parameter of this stage (misspelled?)")
        elif err["type"] == "missing":
            lines.append(f"'{key}' is missing")
        else:
            lines.append(f"'{key}' = {err.get('input')!r}: {err['msg']}")
    return "; ".join(lines)


def validate_section(paper: str, stage: str, model: type[BaseModel], section: Any,
                     source: str = "params.yaml") -> BaseModel:
    if section is None:
        raise ParamsError(f"{source} has no section '{paper}.{stage}'. Add it (see the stage's "
                          f"parameters with `python -m tasks list {paper}`).")
    if not isinstance(section, dict):
        raise ParamsError(f"'{paper}.{stage}' in {source} must be a mapping, got {section!r}.")
    try:
        return model.model_validate(section)
    except ValidationError as exc:
        allowed = ", ".join(model.model_fields)
        raise ParamsError(f"Invalid parameters in {source}: {_format_validation(paper, stage, exc)}. "
                          f"Allowed keys of '{paper}.{stage}': {allowed}. Fix {source} (or the "
                          f"`-S` override) and run again.") from exc


def validate_globals(data: dict, source: str = "params.yaml") -> GlobalParams:
    try:
        return GlobalParams.model_validate({"seed": data.get("seed"), "device": data.get("device")})
    except ValidationError as exc:
        msgs = "; ".join(f"'{e['loc'][0]}' = {e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise ParamsError(f"Invalid global parameters in {source}: {msgs}. Set top-level 'seed' "
                          f"(integer >= 0) and 'device' ('auto', 'cpu', 'cuda' or 'cuda:N').") from exc
