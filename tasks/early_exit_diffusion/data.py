"""The prepared data of ASE: what ``prepare`` writes and every later stage reads.

``artifacts/early_exit_diffusion/prepare/``: ``data.npz`` (x_train, y_train, x_test, y_test; images in
[-1, 1] or VAE latents), ``classifier.safetensors`` (the FD-proxy classifier) and ``meta.json``
(:class:`PreparedMeta`).
"""
from __future__ import annotations

from pathlib import Path

from tasks.core import Params, io


class PreparedMeta(Params):
    """``prepare/meta.json``."""

    source: str
    shape: list[int]                   # [C, H, W] of one image (or latent)
    num_classes: int
    n_train: int
    n_test: int
    classifier_test_accuracy: float
    fd_proxy_floor: float              # FD-proxy of real train vs real held-out images
    pixel_range: list[float] | None    # [-1, 1] for images; None for latents (no clamping)


def load_prepared(folder: Path):
    """(tensors {x_train, y_train, x_test, y_test}, :class:`PreparedMeta`) of a prepare output folder."""
    import torch

    data = {k: torch.from_numpy(v) for k, v in io.load_arrays(folder / "data.npz").items()}
    return data, PreparedMeta.model_validate(io.read_json(folder / "meta.json"))
