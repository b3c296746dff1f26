"""Editing one stage's module makes only that stage (and what runs after it) stale under DVC."""
from __future__ import annotations

import json
import shutil

import pytest

from tasks.core.registry import papers
from tests.conftest import ROOT, dvc, project_files

pytestmark = pytest.mark.slow


def test_editing_an_evaluate_module_stales_only_its_evaluate_stage(tmp_path):
    repo = tmp_path / "repo"
    for rel in project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    edited = {f"tasks/{p}/evaluate.py": p for p in papers()}
    for rel in edited:
        with open(repo / rel, "a") as fh:
            fh.write("# an edit that must re-run only this paper's evaluate stage\n")
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    stale_by_edit = {}
    for stage_name, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            for path in (change.get("changed deps") or {}) if isinstance(change, dict) else {}:
                if path in edited:
                    stale_by_edit.setdefault(path, set()).add(stage_name)
    assert stale_by_edit == {rel: {f"{paper}-evaluate"} for rel, paper in edited.items()}
