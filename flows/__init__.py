"""Prefect flows: one named flow per paper (``flows/<paper>.py``) and ``all_papers``."""
from __future__ import annotations

import importlib
import importlib.util



def get_flow(paper: str):
    """The ``@flow`` of ``paper`` (module ``flows.<paper>``, function of the same name)."""
    from tasks.core.registry import get_paper

    get_paper(paper)  # clear error for unknown papers
    return getattr(importlib.import_module(f"flows.{paper}"), paper)


def available() -> list[str]:
    from tasks.core.registry import papers

    out = []
    for paper in papers():
        try:
            importlib.util.find_spec(f"flows.{paper}") and out.append(paper)
        except ModuleNotFoundError:
            pass
    return out
