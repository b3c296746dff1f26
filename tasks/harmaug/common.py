"""What the harmaug stages share: jsonl rows, the world file, and loading the models a stage names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core import io
from tasks.core.errors import MissingInputError

VARIANTS = ("kd_only", "eda", "no_prefix", "harmaug")  # the students: D, D+EDA(D), D+D̂(no prefix), D+D̂
AUGMENTED = {"eda": "eda.jsonl", "no_prefix": "no_prefix.jsonl", "harmaug": "harmaug.jsonl"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    io.write_text(path, "".join(json.dumps(io._jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise MissingInputError(f"missing data file '{path}'")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def columns(rows: list[dict], *keys: str) -> tuple[list, ...]:
    return tuple([r[k] for r in rows] for k in keys)


def load_world(prepare_dir: Path):
    """The harm world of ``prepare`` (None when the data came from local files: no oracle there)."""
    from models.harmaug.world import HarmWorld

    meta = io.read_json(prepare_dir / "meta.json")
    return HarmWorld(**meta["world"]) if meta["source"] == "world" else None


def categories(category: str) -> list[str]:
    """'c3+c7' -> ['c3', 'c7'] (a row's harm categories; local data use one subcategory name)."""
    return [c for c in category.split("+") if c]


def seen_categories(prepare_dir: Path) -> list[str]:
    return io.read_json(prepare_dir / "meta.json")["seen_categories"]


def resolve(folder: Path, path: str) -> Path:
    """A model path of ``models.json``: relative to the pretrain folder, or absolute (paper scale)."""
    p = Path(path)
    return p if p.is_absolute() else folder / p


def check_model_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingInputError(f"{what}: no model folder at '{path}' (a save_pretrained folder with its "
                                f"tokenizer); see docs/harmaug.md for the paper-scale layout.")
    return path


def load_causal_lm(path: Path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval(), tok


def load_classifier(path: Path, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval(), tok


def load_teacher(pretrain_dir: Path, device):
    """The teacher guard named in ``pretrain/models.json``: a classifier, or a Llama-Guard-style causal LM
    scored on its first token."""
    from models.harmaug.guard import CausalLMGuard, ClassifierGuard

    spec = io.read_json(pretrain_dir / "models.json")["teacher"]
    path = check_model_dir(resolve(pretrain_dir, spec["path"]), "teacher")
    if spec["kind"] == "classifier":
        model, tok = load_classifier(path, device)
        return ClassifierGuard(model, tok, spec["max_length"])
    model, tok = load_causal_lm(path, device)
    return CausalLMGuard(model, tok, spec["safe_token"], spec["unsafe_token"], spec["suffix"], spec["max_length"])


def model_path(pretrain_dir: Path, name: str) -> Path:
    spec: Any = io.read_json(pretrain_dir / "models.json")[name]
    return check_model_dir(resolve(pretrain_dir, spec["path"]), name)


def soft_labels(rows: list[dict]) -> np.ndarray:
    return np.asarray([r["soft"] for r in rows], dtype=np.float64)
