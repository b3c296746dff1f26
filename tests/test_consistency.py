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
