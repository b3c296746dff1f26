"""Switch ``params.yaml`` between scales by applying ``scales/<scale>.yaml`` overrides in place."""
from __future__ import annotations

from pathlib import Path

from .errors import ParamsError
from .params import flatten, scale_overrides


def set_params(root: Path, assignments: dict[str, object]) -> None:
    """Set dotted keys in params.yaml, keeping comments and order (like ``dvc exp run -S``)."""
    from ruamel.yaml import YAML

    from . import io

    from ruamel.yaml.comments import CommentedSeq

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    path = root / "params.yaml"
    data = yaml.load(path.read_text())
    for dotted, value in assignments.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            if key not in node or not hasattr(node[key], "keys"):
                raise ParamsError(f"Cannot set '{dotted}': '{key}' is not a section of params.yaml.")
            node = node[key]
        if isinstance(value, list):  # keep lists in flow style, as params.yaml writes them
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        node[keys[-1]] = value
    import io as _io

    buf = _io.StringIO()
    yaml.dump(data, buf)
    io.write_text(path, buf.getvalue())


def apply_scale(root: Path, scale: str, papers: list[str] | None = None) -> dict[str, object]:
    """Apply a scale's overrides to params.yaml; returns the dotted assignments made."""
    assignments = flatten(scale_overrides(root, scale, papers))
    if assignments:
        set_params(root, assignments)
    return assignments


def scale_set_params(root: Path, scale: str, papers: list[str] | None = None) -> list[str]:
    """The same overrides as ``key=value`` strings for ``dvc exp run -S``."""
    import json

    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in flatten(scale_overrides(root, scale, papers)).items()]
