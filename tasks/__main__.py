"""CLI: ``python -m tasks run <paper> <stage>`` runs one stage (what dvc.yaml calls).

Exit codes: 0 done, 2 bad input (unknown paper/stage, invalid params, missing inputs), 1 a failure.
"""
from __future__ import annotations

import argparse
import sys


def _papers_help() -> str:
    from .core.registry import papers  # discovered without importing any stage

    return ("papers (`python -m tasks list <paper>` shows its stages and parameters):\n"
            + "\n".join(f"  {p}" for p in papers()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run paperflows stages (each paper is a chain of DVC stages).",
        epilog=_papers_help() + "\n\nexamples:\n  python -m tasks run lowprec_ensemble prepare\n"
               "  python -m tasks list lowprec_ensemble\n  python -m tasks scale smoke")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage with the parameters in params.yaml",
                         description="Run one stage: validate params.yaml, check the upstream "
                                     "outputs, run, write outputs atomically, log to MLflow.")
    run.add_argument("paper", help="paper id, e.g. lowprec_ensemble")
    run.add_argument("stage", help="stage name, e.g. prepare")
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ls = sub.add_parser("list", help="list papers, or a paper's stages and their parameters")
    ls.add_argument("paper", nargs="?", help="paper id")
    sc = sub.add_parser("scale", help="switch params.yaml to a scale (smoke, cpu, paper)",
                        description="Apply scales/<scale>.yaml overrides to params.yaml in place "
                                    "(git checkout params.yaml returns to the CPU default). "
                                    "--print shows them as `dvc exp run -S` flags instead.")
    sc.add_argument("scale", choices=["smoke", "cpu", "paper"])
    sc.add_argument("--paper", action="append", dest="papers", help="only this paper (repeatable)")
    sc.add_argument("--print", action="store_true", help="print -S flags, change nothing")
    cl = sub.add_parser("claims", help="print every paper's claims from results/<paper>/metrics.json",
                        description="A markdown table of the claims in results/*/metrics.json: verdict, "
                                    "effect with its 95%% CI against the margin, n, and the gate or "
                                    "reason of an untestable claim.")
    cl.add_argument("--readme", action="store_true",
                    help="rewrite the README's generated results table instead of printing")
    sd = sub.add_parser("seeds", help="re-run a paper under other global seeds and compare its verdicts",
                        description="Re-run <paper>'s pipeline once per extra global `seed`, each in a "
                                    "temporary copy of the workspace (the workspace is not touched), and "
                                    "compare every claim's verdict with the committed run's. Writes "
                                    "results/seed_checks/<paper>.json and prints a table. Takes the "
                                    "paper's CPU time once per seed.")
    sd.add_argument("paper", help="paper id, e.g. lowprec_ensemble")
    sd.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000],
                    help="global seeds besides params.yaml's (default: 1000 2000)")
    return parser


def _claims(readme: bool) -> None:
    from .report import claims_table, update_readme
    from .core.settings import find_root

    root = find_root()
    if readme:
        print("README.md results table " + ("updated" if update_readme(root) else "already up to date"))
    else:
        print(claims_table(root), end="")


def _list(paper: str | None) -> None:
    from .core.registry import get_paper, papers

    if paper is None:
        print("\n".join(papers()))
        return
    for name, st in get_paper(paper).items():
        print(f"{st.dvc_name}{'  [gpu]' if st.gpu else ''}: {st.description}")
        if st.inputs:
            print(f"  inputs: {', '.join(st.inputs)}")
        for key, field in st.params.model_fields.items():
            print(f"  {paper}.{name}.{key}: {field.annotation.__name__ if hasattr(field.annotation, '__name__') else field.annotation}"
                  f"{' - ' + field.description if field.description else ''}")


def main(argv: list[str] | None = None) -> int:
    from .core import errors

    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from .core.context import run_stage

            run_stage(args.paper, args.stage, track=not args.no_mlflow)
        elif args.command == "claims":
            _claims(args.readme)
        elif args.command == "seeds":
            from .core.settings import find_root
            from .seedcheck import seed_check, table

            try:
                result = seed_check(find_root(), args.paper, args.seeds, log=lambda m: print(m, file=sys.stderr))
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(table(result), end="")
            print(f"verdicts {'unchanged' if result['same'] else 'CHANGED: ' + ', '.join(result['changed'])} "
                  f"across seeds {result['seeds']}")
        elif args.command == "list":
            _list(args.paper)
        elif args.command == "scale":
            from .core.scales import apply_scale, scale_set_params
            from .core.settings import find_root

            root = find_root()
            if args.print:
                print(" ".join(f"-S '{a}'" for a in scale_set_params(root, args.scale, args.papers)))
            else:
                done = apply_scale(root, args.scale, args.papers)
                print(f"params.yaml: {len(done)} values set for scale '{args.scale}'")
    except errors.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:
        if type(exc).__name__ == "Terminated":  # SIGTERM: outputs left as they were, MLflow run KILLED
            print(f"error: {exc}; nothing was written", file=sys.stderr)
            return 143
        raise
    return 0


if __name__ == "__main__":
    from tasks.stageserver import forward  # stdlib only: a warm server runs the stage if one is up

    forwarded = forward(sys.argv[1:])
    sys.exit(main() if forwarded is None else forwarded)
