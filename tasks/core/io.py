"""Atomic output writing: a killed stage never leaves a half-written artifact behind.

Files are written to a temporary sibling and renamed; stage folders are built in a temporary
sibling folder and swapped in whole when the stage function returns.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # torch scalars
        return obj.item()
    return obj


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` atomically (loaded back with ``allow_pickle=False``)."""
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_state(path: Path, state: dict) -> None:
    """A dict of tensors as safetensors, atomically (tensors are detached, moved to the CPU and made
    contiguous; the one way stages save weights)."""
    from safetensors.torch import save

    with atomic_file(path, "wb") as fh:
        fh.write(save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def load_state(path: Path, device: str = "cpu") -> dict:
    """Tensors saved by :func:`save_state` (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def new_tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` in as ``final`` (old content removed only after the new one is complete)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(folder: Path, name: str) -> None:
    """Remove temp leftovers of an earlier killed run of the stage writing ``folder/name``."""
    if folder.is_dir():
        for p in folder.glob(f".{name}{TMP_MARK}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
