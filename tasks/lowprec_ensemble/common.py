"""What several lowprec_ensemble stages share: the data splits, the trained models' description
(``TrainMeta``, written by train and re-validated where read) and model loading."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.core import io


class TrainMeta(BaseModel):
    """``artifacts/lowprec_ensemble/train/meta.json``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp", "pretrained"]
    seeds: list[int]
    in_features: int | None
    hidden: list[int]
    num_classes: int | None
    deep_ensemble_size: int
    snapshots: int
    swag: bool
    ivon: bool
    widths: list[int]

    @classmethod
    def read(cls, folder: Path) -> "TrainMeta":
        return cls.model_validate(io.read_json(folder / "meta.json"))


def load_data(folder: Path) -> dict:
    import torch

    return {k: torch.from_numpy(v) for k, v in io.load_arrays(folder / "data.npz").items()}


def build_mlp(meta: TrainMeta, width: int | None = None):
    """The MLP of ``meta`` (``width``: every hidden layer that wide, for the width sweep)."""
    from models.common.mlp import MLP

    hidden = meta.hidden if width is None else [width] * len(meta.hidden)
    return MLP(meta.in_features, hidden, meta.num_classes)


def member_file(seed: int, name: str) -> str:
    return f"seed{seed}/{name}.safetensors"


def load_model(train_dir: Path, meta: TrainMeta, seed: int, name: str = "fp32", device="cpu",
               width: int | None = None):
    """The trained MLP ``name`` of ``seed`` (or the pretrained HF model) and its logits accessor."""
    if meta.kind == "pretrained":
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(train_dir / "pretrained"),
                                                                use_safetensors=True)
        return model.eval().to(device), (lambda out: out.logits)
    model = build_mlp(meta, width)
    model.load_state_dict(io.load_state(train_dir / member_file(seed, name)))
    return model.eval().to(device), (lambda out: out)


def example_nll(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(y | x) per test example (the mean is ``tasks.metrics.nll``)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return -np.log(np.clip(p, 1e-12, 1.0))


class EnsembleMeta(BaseModel):
    """``artifacts/lowprec_ensemble/ensemble/meta.json``."""

    model_config = ConfigDict(extra="forbid")
    seeds: list[int]
    bits: list[int]
    sizes: list[int]
    quantized_params: int
    fp_params: int
    snapshot_lpe_bits: int
    snapshot_lpe_members: int
    bma_lpe_bits: int
    widths: list[int]
    width_bits: int
    width_evidence_bits: list[int]

    @classmethod
    def read(cls, folder: Path) -> "EnsembleMeta":
        return cls.model_validate(io.read_json(folder / "meta.json"))
