"""ASE end to end at smoke scale through the Prefect flow."""
from __future__ import annotations

import pytest

from tests.conftest import make_clone
from tests.test_early_exit_diffusion_pipeline import PAPER, check_results


@pytest.mark.slow
def test_pipeline_at_smoke_scale_through_the_prefect_flow(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    repo = make_clone(tmp_path / "repo", scale="smoke", papers=[PAPER])
    monkeypatch.setenv("PAPERFLOWS_ROOT", str(repo))
    monkeypatch.chdir(repo)
    from flows.early_exit_diffusion import early_exit_diffusion

    out = early_exit_diffusion()  # the clone's params.yaml is the smoke scale: a default run writes results/
    assert out["stages_run"] == 4
    _, evidence = check_results(repo)
    assert evidence["seeds"] == [0, 1]
