"""dvc.yaml, params.yaml and the stage registry agree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.core.registry import load_all
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = [st for stages in load_all().values() for st in stages.values()]


def test_every_registered_stage_is_in_dvc_yaml_and_vice_versa():
    assert sorted(st.dvc_name for st in STAGES) == sorted(DVC)


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_stage_command_params_and_outs(st):
    entry = DVC[st.dvc_name]
    assert entry["cmd"] == f"python -m tasks run {st.paper} {st.name}"
    assert sorted(entry["params"]) == sorted(["seed", "device", f"{st.paper}.{st.name}"])
    section = PARAMS[st.paper][st.name]
    assert set(section) <= set(st.params.model_fields), "params.yaml keys the validator does not read"
    st.params.model_validate(section)  # the committed CPU-scale values are valid
    outs = [o if isinstance(o, str) else next(iter(o)) for o in entry["outs"]]
    assert f"artifacts/{st.paper}/{st.name}" in outs
    if st.writes_results:  # results/<paper> in git, and a cached copy in the artifact for remotes
        assert {f"results/{st.paper}": {"cache": False}} in entry["outs"]
    for name in st.inputs:
        assert f"artifacts/{st.paper}/{name}" in entry["deps"], f"{st.dvc_name} reads {name}"


def _imports_of(nodes) -> set[str]:
    names: set[str] = set()
    for tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in ("tasks", "models")}


def _files(names: set[str]) -> set[Path]:
    out = set()
    for name in names:
        base = ROOT / Path(*name.split("."))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                out.add(cand)
    return out


def module_imports(path: Path, seen: set[Path]) -> set[Path]:
    """Project files a module imports anywhere in it, transitively."""
    if path in seen:
        return seen
    seen.add(path)
    for f in _files(_imports_of([ast.parse(path.read_text())])):
        module_imports(f, seen)
    return seen


def stage_imports(module: Path, fn_name: str) -> set[Path]:
    """Files a stage function needs: its module's top-level imports, the imports inside the stage
    function and inside the module's functions it calls, then everything those files import."""
    tree = ast.parse(module.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    todo, used = [fn_name], set()
    while todo:
        name = todo.pop()
        if name in used or name not in funcs:
            continue
        used.add(name)
        todo += [n.id for n in ast.walk(funcs[name]) if isinstance(n, ast.Name)]
    files: set[Path] = {module}
    for f in _files(_imports_of(top + [funcs[n] for n in used])):
        files |= module_imports(f, set())
    return files


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_stage_depends_on_the_code_it_imports(st):
    deps = [ROOT / d for d in DVC[st.dvc_name]["deps"]]
    module = Path(st.fn.__code__.co_filename)
    imported = stage_imports(module, st.fn.__name__)
    missing = [p.relative_to(ROOT) for p in imported
               if not (p.name == "__init__.py" and p.parent.name != "core")
               if not any(p == d or d in p.parents for d in deps)]
    assert not missing, f"{st.dvc_name} imports {missing} but dvc.yaml does not list them in deps"


# ------------------------------------------------------------------ params.yaml is the only source of values
SCALES = {name: yaml.safe_load((ROOT / "scales" / f"{name}.yaml").read_text()) for name in ("smoke", "paper")}


def _fields_with_defaults(model, prefix: str) -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        if not field.is_required():
            out.append(f"{prefix}.{name}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields_with_defaults(ann, f"{prefix}.{name}")
    return out


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_params_models_carry_no_defaults(st):
    """A key deleted from params.yaml must fail validation, not silently take another value."""
    assert _fields_with_defaults(st.params, f"{st.paper}.{st.name}") == []


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_scale_files_set_only_known_keys_and_validate(st):
    from tasks.core.params import deep_merge

    for scale, data in SCALES.items():
        section = (data.get(st.paper) or {}).get(st.name) or {}
        unknown = set(section) - set(st.params.model_fields)
        assert not unknown, f"scales/{scale}.yaml sets {unknown} that {st.dvc_name} does not read"
        merged = deep_merge(PARAMS[st.paper][st.name], section)
        if scale == "smoke":
            st.params.model_validate(merged)


def test_device_is_validated():
    from tasks.core.errors import ParamsError
    from tasks.core.params import validate_globals

    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert validate_globals({"seed": 0, "device": ok}).device == ok
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ParamsError, match="device"):
            validate_globals({"seed": 0, "device": bad})


# ------------------------------------------------------------------------- one module per stage, sizes
def _paper_modules(paper: str) -> list[Path]:
    return sorted((ROOT / "tasks" / paper).glob("*.py"))


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_stage_lives_in_its_own_module_and_imports_no_sibling_stage(st):
    module = Path(st.fn.__code__.co_filename)
    assert module == ROOT / "tasks" / st.paper / f"{st.name}.py"
    siblings = {f"tasks.{st.paper}.{s}" for s in load_all()[st.paper] if s != st.name}
    tree = ast.parse(module.read_text())
    imported = _imports_of([tree]) | {f"tasks.{st.paper}.{n.module}" for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert not imported & siblings, f"{st.dvc_name} imports another stage's module"
    deps = DVC[st.dvc_name]["deps"]
    assert f"tasks/{st.paper}" not in deps and not [
        d for d in deps if d.startswith(f"tasks/{st.paper}/") and Path(d).stem in load_all()[st.paper]
        and Path(d).stem != st.name], f"{st.dvc_name} depends on another stage's module"


def _code_files() -> list[Path]:
    return sorted(p for top in ("tasks", "models") for p in (ROOT / top).rglob("*.py"))


def test_no_file_in_tasks_or_models_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _code_files() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


@pytest.mark.parametrize("st", STAGES, ids=lambda s: s.dvc_name)
def test_no_stage_function_over_80_lines(st):
    tree = ast.parse(Path(st.fn.__code__.co_filename).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == st.fn.__name__)
    assert fn.end_lineno - fn.lineno + 1 <= 80


def test_models_never_import_tasks_mlflow_or_prefect():
    for path in (ROOT / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        bad = {n for n in names if n.split(".")[0] in ("tasks", "mlflow", "prefect", "dvc")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# ------------------------------------------------------------------------------- README results table
def test_readme_results_table_is_generated_from_the_metrics():
    from tasks.report import README_END, README_START, readme_table

    text = (ROOT / "README.md").read_text()
    block = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert block.strip() == readme_table(ROOT).strip(), "run `python -m tasks claims --readme`"


@pytest.mark.parametrize("paper", sorted(load_all()))
def test_committed_claims_follow_from_their_details(paper):
    import json

    from tasks.core.claims import rederive

    path = ROOT / "results" / paper / "metrics.json"
    metrics = json.loads(path.read_text())
    assert set(metrics) >= {"claims", "claims_detail", "gates"}
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
