"""The `dvc-stage` flow: one DVC stage in this worker's workspace (deployed on the cpu and gpu pools).

A paper flow with ``executor='pools'`` starts one run of it per stage. The worker that picks it up
applies the run's params, writes the upstream stages' dvc.lock entries, pulls their outputs from the
DVC remote, runs ``dvc repro --single-item``, pushes the outputs and reports the stage's lock entry;
then it restores its workspace's params.yaml, dvc.lock and results (a worker never accumulates
earlier runs' overrides).
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.core import GPU_TAG, WorkspaceGuard, dvc_stage, has_remote, merge_lock, read_lock, run_dvc
from tasks.core.registry import get_stage
from tasks.core.scales import set_params
from tasks.core.settings import find_root


@flow(name="dvc-stage", log_prints=True)
def dvc_stage_flow(paper: str, stage: str, assignments: dict[str, Any] | None = None,
                   lock_entries: dict[str, Any] | None = None,
                   parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage of a paper in this worker's workspace.

    Args:
        paper: paper id.
        stage: stage name.
        assignments: params.yaml values to set first (the flow run's scale and overrides).
        lock_entries: dvc.lock entries of upstream stages run elsewhere; their outputs are pulled.
        parent_run_id: MLflow run id of the paper flow's parent run.
    """
    st = get_stage(paper, stage)
    root = find_root()
    guard = WorkspaceGuard(root, paper)  # the worker's workspace keeps its own params and lock
    try:
        if assignments:
            set_params(root, assignments)
        merge_lock(root, lock_entries or {})
        remote = has_remote(root)
        log = print
        upstream = [f"{paper}-{name}" for name in st.inputs]
        if remote and upstream:
            run_dvc(["pull", *upstream], root, dict(os.environ), log)
        result = dvc_stage.with_options(name=st.dvc_name, tags=[GPU_TAG] if st.gpu else [])(
            st.dvc_name, str(root), parent_run_id)
        if remote:
            run_dvc(["push", st.dvc_name], root, dict(os.environ), log)
        lock = read_lock(root).get(st.dvc_name)
    finally:
        guard.restore(print)
    report = {**result, "lock": lock, "host": socket.gethostname(),
              "workspace": str(root), "pool_tag": GPU_TAG if st.gpu else "cpu"}
    create_markdown_artifact(key="dvc-stage-report", markdown=json.dumps(report),
                             description=f"{st.dvc_name}: dvc.lock entry and timings")
    return report
