"""`python -m tasks seeds`: a paper re-run under other global seeds in temporary workspaces, verdicts compared."""
from __future__ import annotations

import json
import subprocess

from tests.conftest import dvc, make_clone, tasks_cli

from tasks.seedcheck import compare, table

PAPER = "lowprec_ensemble"


def test_compare_flags_every_claim_whose_verdict_moved():
    runs = [{"seed": 0, "claims": {"a": True, "b": False, "c": None}},
            {"seed": 1, "claims": {"a": True, "b": True, "c": None}},
            {"seed": 2, "claims": {"a": True, "b": False, "c": False}}]
    out = compare(runs)
    assert out["seeds"] == [0, 1, 2] and out["changed"] == ["b", "c"] and not out["same"]
    assert out["verdicts"]["c"] == [None, None, False]
    assert "| b | false | true | false | **no** |" in table(out)
    assert compare(runs[:1])["same"]


def test_seed_check_leaves_the_workspace_as_it_was(tmp_path, mlflow_uri):
    repo = make_clone(tmp_path / "repo")
    dvc(repo, "repro", f"{PAPER}-evaluate")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], cwd=repo,
                   check=True)
    done = tasks_cli(repo, "seeds", PAPER, "--seeds", "7")
    assert done.returncode == 0, done.stderr
    assert "seed 7" in done.stdout and "across seeds [0, 7]" in done.stdout
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status.split() == ["??", "results/seed_checks/"]  # the only change: the comparison itself
    result = json.loads((repo / "results" / "seed_checks" / f"{PAPER}.json").read_text())
    assert result["seeds"] == [0, 7] and set(result["verdicts"]) == set(result["runs"][0]["claims"])
    bad = tasks_cli(repo, "seeds", PAPER, "--seeds", "0")
    assert bad.returncode == 2 and "seed 0" in bad.stderr
    assert tasks_cli(repo, "seeds", "no_such_paper").returncode == 2


def test_readme_seed_column_reads_the_check_and_spots_a_stale_one(tmp_path):
    from tasks.report import seed_cell

    metrics = {"claims": {"a": True, "b": False}}
    assert seed_cell(tmp_path, PAPER, metrics) == "not checked"
    path = tmp_path / "results" / "seed_checks" / f"{PAPER}.json"
    path.parent.mkdir(parents=True)
    runs = [{"seed": 0, "claims": {"a": True, "b": False}}, {"seed": 1000, "claims": {"a": True, "b": True}}]
    path.write_text(json.dumps({**compare(runs), "runs": runs}))
    assert seed_cell(tmp_path, PAPER, metrics) == "changed (0, 1000): flipped: `b`"
    runs[1]["claims"] = {"a": None, "b": False}  # a gate failed under seed 1000
    path.write_text(json.dumps({**compare(runs), "runs": runs}))
    assert seed_cell(tmp_path, PAPER, metrics) == ("changed (0, 1000): a gate failed under seed 1000 "
                                                   "(claims null there)")
    assert seed_cell(tmp_path, PAPER, {"claims": {"a": False, "b": False}}).startswith("stale")
