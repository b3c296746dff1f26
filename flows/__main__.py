"""CLI: ``python -m flows <paper|all> [--stages ...] [--scale cpu] [--set key=value ...]``."""
from __future__ import annotations

import argparse
import json
import sys

from tasks.core.settings import apply_offline_defaults

apply_offline_defaults()


def build_parser() -> argparse.ArgumentParser:
    from flows import available

    papers = available()
    parser = argparse.ArgumentParser(
        prog="python -m flows", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a paper's Prefect flow: one task per DVC stage (DVC skips what is up to "
                    "date), GPU stages tagged 'gpu', MLflow parent run with a child per stage run.",
        epilog="papers: " + ", ".join(papers) + ", all\n\nexamples:\n"
               "  python -m flows lowprec_ensemble\n"
               "  python -m flows lowprec_ensemble --stages ensemble evaluate\n"
               "  python -m flows lowprec_ensemble --set lowprec_ensemble.ensemble.bits=[3,4]\n"
               "  python -m flows all --scale smoke")
    parser.add_argument("paper", help="paper id, or 'all'")
    parser.add_argument("--stages", nargs="+", help="run only these stages (in pipeline order)")
    parser.add_argument("--scale", choices=["smoke", "cpu", "paper"], default="cpu",
                        help="apply scales/<scale>.yaml to params.yaml first (default: cpu, no change)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value (repeatable), like dvc exp run -S")
    return parser


def main(argv: list[str] | None = None) -> int:
    from tasks.core.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        if args.paper == "all":
            from flows.all_papers import all_papers

            result = all_papers(scale=args.scale)
        else:
            from flows import get_flow

            result = get_flow(args.paper)(stages=args.stages, scale=args.scale,
                                          overrides=args.overrides or None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
