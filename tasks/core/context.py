"""``StageContext`` (what a stage function sees) and ``run_stage`` (how every caller runs one)."""
from __future__ import annotations

import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel

from . import io
from .errors import MissingInputError, ParamsError
from .params import load_yaml, validate_globals, validate_section
from .registry import Stage, get_stage
from .settings import apply_offline_defaults, find_root
from .tracking import Tracker, git_commit


def artifact_dir(root: Path, paper: str, stage: str) -> Path:
    return root / "artifacts" / paper / stage


def results_dir(root: Path, paper: str) -> Path:
    return root / "results" / paper


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"'device' is '{spec}' but no CUDA device is visible. Set 'device: auto' or "
                          f"'cpu' in params.yaml, or run on a GPU worker.")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StageContext:
    """Everything a stage function needs; paths are absolute."""

    stage: Stage
    root: Path
    params: BaseModel
    seed: int
    device: Any
    out_dir: Path                      # temp folder, swapped in as artifacts/<paper>/<stage> on success
    results_dir: Path | None = None    # temp folder for results/<paper> (terminal stage only)
    tracker: Tracker | None = None
    figures: list[Path] = field(default_factory=list)

    @property
    def paper(self) -> str:
        return self.stage.paper

    @property
    def name(self) -> str:
        return self.stage.name

    def input(self, stage_name: str) -> Path:
        """Output folder of upstream stage ``stage_name`` of this paper (must be a declared input)."""
        if stage_name not in self.stage.inputs:
            raise ValueError(f"{self.stage.dvc_name} reads '{stage_name}' but does not declare it in "
                             f"inputs={self.stage.inputs}")
        return artifact_dir(self.root, self.paper, stage_name)

    def progress(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None,
                 **kw) -> Iterator:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        return tqdm(iterable, desc=f"{self.stage.dvc_name} {desc}".strip(), total=total,
                    mininterval=0.5 if tty else 5.0, dynamic_ncols=True, leave=tty,
                    disable=os.environ.get("PAPERFLOWS_NO_PROGRESS") == "1", **kw)

    def map(self, fn, jobs, workers: int = 1, desc: str = "", on_result=None) -> list:
        """Run independent jobs (seeds, tasks) in ``workers`` processes, one torch thread each; see
        ``tasks.core.parallel.map_jobs``. Results in job order."""
        from .parallel import map_jobs

        return map_jobs(fn, jobs, workers=workers, progress=self.progress, desc=desc, on_result=on_result)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step=step)

    def log_figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as PNG (results/<paper>/plots for the terminal stage, else the
        stage's own plots folder); it is logged to MLflow when the stage succeeds."""
        import matplotlib.pyplot as plt

        folder = (self.results_dir or self.out_dir) / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (name if name.endswith(".png") else f"{name}.png")
        with io.atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(path)
        return path

    def write_metrics(self, claims, gates=(), headline: dict | None = None,
                      evidence: dict | None = None) -> Path:
        """results/<paper>/metrics.json: ``claims`` (true/false/null), ``claims_detail`` (effect, CI,
        margin, n, gate and reason), ``gates`` and at most ``HEADLINE_LIMIT`` headline numbers named
        as the paper's tables name them; the claims' long form (statements, parts) and everything
        else go to ``evidence.json`` beside it (logged to MLflow with the results folder)."""
        from .claims import payload

        if self.results_dir is None:
            raise RuntimeError(f"{self.stage.dvc_name} is not the terminal stage; only evaluate "
                               f"writes results/{self.paper}/metrics.json")
        headline = dict(headline or {})
        leaves = _count_leaves(headline)
        if leaves > HEADLINE_LIMIT:
            raise ValueError(f"metrics.json takes at most {HEADLINE_LIMIT} headline numbers, got {leaves}: "
                             f"move the rest to evidence")
        data, claims_evidence = payload(claims, gates)
        data["headline"] = headline
        path = self.results_dir / "metrics.json"
        io.write_json(path, data)
        io.write_json(self.results_dir / "evidence.json", {**claims_evidence, **(evidence or {})})
        return path

    def results_file(self, name: str) -> Path:
        if self.results_dir is None:
            raise RuntimeError(f"{self.stage.dvc_name} does not write results/")
        path = self.results_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


HEADLINE_LIMIT = 30


def _count_leaves(d) -> int:
    if isinstance(d, dict):
        return sum(_count_leaves(v) for v in d.values())
    if isinstance(d, (list, tuple)):
        return sum(_count_leaves(v) for v in d)
    return 1


def load_stage_params(root: Path, stage: Stage, data: dict | None = None):
    source = "params.yaml"
    if data is None:
        data = load_yaml(root / "params.yaml")
    glob = validate_globals(data, source)
    paper_section = data.get(stage.paper)
    if not isinstance(paper_section, dict):
        raise ParamsError(f"{source} has no section '{stage.paper}'. Add it with a subsection per stage.")
    params = validate_section(stage.paper, stage.name, stage.params, paper_section.get(stage.name), source)
    return glob, params


def check_inputs(root: Path, stage: Stage) -> None:
    for name in stage.inputs:
        folder = artifact_dir(root, stage.paper, name)
        if not folder.is_dir():
            rel = folder.relative_to(root)
            raise MissingInputError(
                f"Stage '{stage.dvc_name}' needs '{rel}', the output of stage '{stage.paper}-{name}', "
                f"which does not exist. Run `dvc repro {stage.paper}-{name}` (or `dvc repro "
                f"{stage.dvc_name}`, which runs the upstream stages first).")


def run_stage(paper: str, name: str, root: Path | None = None, params: dict | None = None,
              track: bool = True) -> dict[str, Any]:
    """Validate, run and commit one stage. Returns {'seconds', 'out_dir', 'run_id'}.

    ``params`` is a whole params.yaml-shaped dict (default: read ``root/params.yaml``). Nothing is
    written when validation or the input check fails; a failure or kill leaves the previous outputs.
    """
    root = apply_offline_defaults(Path(root).resolve() if root else find_root())
    stage = get_stage(paper, name)
    glob, stage_params = load_stage_params(root, stage, params)
    check_inputs(root, stage)
    device = resolve_device(glob.device)

    import torch

    torch.set_flush_denormal(True)
    if os.environ.get("PAPERFLOWS_THREADS"):
        torch.set_num_threads(int(os.environ["PAPERFLOWS_THREADS"]))
    seed_everything(glob.seed)

    final_out = artifact_dir(root, paper, name)
    io.remove_stale_tmp(final_out.parent, name)
    out_tmp = io.new_tmp_dir(final_out)
    res_final = results_dir(root, paper) if stage.writes_results else None
    res_tmp = None
    if res_final is not None:
        io.remove_stale_tmp(res_final.parent, paper)
        res_tmp = io.new_tmp_dir(res_final)

    tags = {"paper": paper, "stage": name, "dvc_stage": stage.dvc_name, "device": str(device),
            "git_commit": git_commit(root), "gpu_stage": str(stage.gpu).lower(),
            "host": socket.gethostname(), "workspace": str(root)}
    tracker = Tracker(root, paper, stage.dvc_name, tags, enabled=track)
    ctx = StageContext(stage, root, stage_params, glob.seed, device, out_tmp, res_tmp, tracker)
    start = time.perf_counter()
    try:
        tracker.log_params({**stage_params.model_dump(mode="json"), "seed": glob.seed,
                            "device": glob.device})
        stage.fn(ctx, stage_params)
        seconds = time.perf_counter() - start
        if res_tmp is not None:  # a cached copy travels through DVC remotes (results/ is git's)
            import shutil

            shutil.copytree(res_tmp, out_tmp / "results")
        io.commit_dir(out_tmp, final_out)
        if res_tmp is not None:
            io.commit_dir(res_tmp, res_final)
    except BaseException:
        import shutil

        shutil.rmtree(out_tmp, ignore_errors=True)
        if res_tmp is not None:
            shutil.rmtree(res_tmp, ignore_errors=True)
        tracker.end("FAILED")
        raise
    tracker.log_metrics({"stage_seconds": seconds})
    if res_final is not None:
        tracker.log_artifact(res_final, "results")
    else:
        tracker.log_artifact(final_out / "plots", "plots")
    run_id = tracker.run_id
    tracker.end()
    print(f"[paperflows] {stage.dvc_name} done in {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "out_dir": final_out, "run_id": run_id}
