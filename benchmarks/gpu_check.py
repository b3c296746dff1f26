"""Check on a GPU machine that every stage computes where its params say: on ``device: cuda``.

    python benchmarks/gpu_check.py [--papers lowprec_ensemble ...]

In a fresh copy of the project (a temporary folder; the workspace is not touched) at smoke scale with
``device: cuda`` and one worker per stage (so every job runs in the checked process), it runs each
paper's stages in order and, through a global forward pre-hook, checks for every module call that the
module's own parameters and buffers and every tensor argument are on CUDA. It prints one line per stage
(module calls checked, violations) and exits 1 listing the first violations of each stage, 0 when all
are on CUDA, 3 with a message when this machine has no CUDA device.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class DeviceAudit:
    """A forward pre-hook on every nn.Module call, recording what is not on CUDA."""

    def __init__(self) -> None:
        self.calls = 0
        self.violations: list[str] = []

    def __call__(self, module, args):
        import torch

        self.calls += 1
        own = [(f"parameter {n}", t) for n, t in module.named_parameters(recurse=False)]
        own += [(f"buffer {n}", t) for n, t in module.named_buffers(recurse=False)]
        own += [(f"input {i}", t) for i, t in enumerate(args) if isinstance(t, torch.Tensor)]
        for what, tensor in own:
            if tensor is not None and tensor.device.type != "cuda" and len(self.violations) < 1000:
                self.violations.append(f"{type(module).__name__}: {what} on {tensor.device}")


def one_worker(tree: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            one_worker(value)
        elif key == "workers":
            tree[key] = 1


def main(argv: list[str] | None = None) -> int:
    import torch
    import yaml

    from tasks.core.context import run_stage
    from tasks.core.registry import papers, stage_order
    from tests.conftest import make_clone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", nargs="*", default=None, help="papers to check (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); run it where "
              "`nvidia-smi` lists a GPU and torch is a CUDA build.", file=sys.stderr)
        return 3
    os.environ["PAPERFLOWS_NO_MLFLOW"] = "1"
    audit = DeviceAudit()
    torch.nn.modules.module.register_module_forward_pre_hook(audit)
    failed = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_clone(Path(tmp) / "repo", scale="smoke")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["device"] = "cuda"
        one_worker(params)
        for paper in args.papers or papers():
            for st in stage_order(paper):
                audit.calls, audit.violations = 0, []
                run_stage(paper, st.name, root=repo, params=params, track=False)
                print(f"{st.dvc_name:45s} module calls {audit.calls:7d}  not on CUDA {len(audit.violations)}",
                      flush=True)
                if audit.violations:
                    failed[st.dvc_name] = sorted(set(audit.violations))[:5]
    for name, lines in failed.items():
        print(f"\n{name}:\n  " + "\n  ".join(lines))
    print("\nall on CUDA" if not failed else f"\n{len(failed)} stage(s) compute off the GPU")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
