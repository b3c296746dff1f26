"""Prefect flow over every paper, one after another (papers share one DVC workspace)."""
from __future__ import annotations

from typing import Literal

from prefect import flow


@flow(name="all_papers", log_prints=True)
def all_papers(papers: list[str] | None = None, scale: Literal["smoke", "cpu", "paper"] = "cpu") -> dict:
    """Run every paper's flow as a subflow, sequentially (one DVC workspace cannot run two at once).

    Args:
        papers: paper ids to run (default: every registered paper with a flow).
        scale: 'smoke', 'cpu' (default) or 'paper'.
    """
    from flows import available, get_flow

    out = {}
    for paper in papers or available():
        out[paper] = get_flow(paper)(scale=scale)
    return out
