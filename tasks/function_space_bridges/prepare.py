"""prepare: 1-D functions (GP paths, Gaussian-mixture densities) on every test grid, two image domains
(digits 0-4 and 5-9, or two local image folders at paper scale) at the training and the test resolution,
the FD-proxy classifier, and El Nino anomalies for the posterior stage."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError

from .data import elnino_anomalies, gp_samples, mixture_densities, mixture_parameters


class PrepareParams(Params):
    n_train_functions: int = Field(gt=0, description="training functions per distribution (grid 0)")
    n_test_functions: int = Field(gt=0, description="test functions per distribution and grid")
    function_grids: list[int] = Field(min_length=1, description="grid sizes; the first is the training grid")
    gp_lengthscale: float = Field(gt=0, description="pi_0: GP(0, RBF) length scale")
    mixture_components: list[int] = Field(min_length=2, max_length=2, description="pi_1: [min, max]")
    mixture_means: list[float] = Field(min_length=2, max_length=2, description="component means ~ U[lo, hi]")
    mixture_stds: list[float] = Field(min_length=2, max_length=2, description="component stds ~ U[lo, hi]")
    image_source: Literal["digits", "folders"] = Field(description="digits 0-4 <-> 5-9, or two folders")
    domain_a_dir: str = Field(description="paper scale: folder of domain A images (e.g. EMNIST letters)")
    domain_b_dir: str = Field(description="paper scale: folder of domain B images (e.g. MNIST)")
    channels: int = Field(gt=0, description="image channels (1 for digits)")
    image_size: int = Field(ge=8, description="training resolution")
    test_image_size: int = Field(ge=8, description="zero-shot test resolution (a multiple of image_size)")
    test_fraction: float = Field(gt=0, lt=0.5)
    max_images: int | None = Field(gt=0, description="cap per domain (smoke scale); null: all")
    classifier_epochs: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.test_image_size % self.image_size or self.image_size % 4:
            raise ValueError("test_image_size must be a multiple of image_size, itself divisible by 4")
        if self.image_source == "folders" and not (self.domain_a_dir and self.domain_b_dir):
            raise ValueError("image_source 'folders' needs domain_a_dir and domain_b_dir")
        return self


def function_data(p: PrepareParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    mix = lambda count: mixture_parameters(count, tuple(p.mixture_components), tuple(p.mixture_means),
                                           tuple(p.mixture_stds), rng)
    train_grid = p.function_grids[0]
    out = {"gp_train": gp_samples(p.n_train_functions, train_grid, p.gp_lengthscale, rng),
           "density_train": mixture_densities(mix(p.n_train_functions), train_grid)}
    for n in p.function_grids:
        out[f"gp_test_{n}"] = gp_samples(p.n_test_functions, n, p.gp_lengthscale, rng)
        out[f"density_test_{n}"] = mixture_densities(mix(p.n_test_functions), n)
        out[f"density_heldout_{n}"] = mixture_densities(mix(p.n_test_functions), n)
    return out


def load_folder(root: Path, size: int, channels: int) -> np.ndarray:
    """Every image under ``root`` (recursively), resized to size x size, in [-1, 1], [N, C, S, S]."""
    from PIL import Image

    if not root.is_dir():
        raise MissingInputError(f"Image folder '{root}' does not exist; see docs/function_space_bridges.md.")
    paths = sorted(q for q in root.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        raise MissingInputError(f"Image folder '{root}' holds no .png/.jpg images.")
    mode = "L" if channels == 1 else "RGB"
    images = [np.asarray(Image.open(q).convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32)
              for q in paths]
    x = np.stack(images).reshape(len(images), size, size, channels).transpose(0, 3, 1, 2)
    return x / 127.5 - 1.0


def image_domains(p: PrepareParams) -> tuple[dict, np.ndarray, np.ndarray, list[int]]:
    """Images at both resolutions, classifier labels and domain (0: A, 1: B), and the B classes."""
    if p.image_source == "digits":
        from tasks.data.digits import load_digits_array

        low, labels = load_digits_array(p.image_size)
        high, _ = load_digits_array(p.test_image_size)
        images = {"low": low[:, None] * 2 - 1, "high": high[:, None] * 2 - 1}
        return images, labels, (labels >= 5).astype(np.int64), [5, 6, 7, 8, 9]
    parts = [(load_folder(Path(d), p.image_size, p.channels), load_folder(Path(d), p.test_image_size, p.channels))
             for d in (p.domain_a_dir, p.domain_b_dir)]
    domain = np.concatenate([np.zeros(len(parts[0][0]), np.int64), np.ones(len(parts[1][0]), np.int64)])
    images = {"low": np.concatenate([parts[0][0], parts[1][0]]), "high": np.concatenate([parts[0][1], parts[1][1]])}
    return images, domain, domain, [1]


def split_images(p: PrepareParams, images: dict, labels, domain, seed: int) -> dict[str, np.ndarray]:
    from tasks.data.digits import stratified_split

    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(domain == d))[:p.max_images or None] for d in (0, 1)])
    splits = stratified_split(labels[keep], {"test": p.test_fraction}, seed)
    out = {}
    for split, idx in splits.items():
        rows = keep[idx]
        for d, name in ((0, "a"), (1, "b")):
            sel = rows[domain[rows] == d]
            out[f"{name}_{split}"] = images["low"][sel].astype(np.float32)
            out[f"{name}_{split}_high"] = images["high"][sel].astype(np.float32)
            out[f"{name}_{split}_labels"] = labels[sel]
    return out


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Functions on every grid, the two image domains at both resolutions, the classifier, El Nino."""
    import torch

    from tasks.data.digit_features import classifier_features, train_digit_classifier

    rng = np.random.default_rng(ctx.seed)
    io.save_arrays(ctx.out_dir / "functions.npz", **function_data(p, rng))
    images, labels, domain, b_classes = image_domains(p)
    arrays = split_images(p, images, labels, domain, ctx.seed)
    io.save_arrays(ctx.out_dir / "images.npz", **arrays)
    train_x = np.concatenate([arrays["a_train"], arrays["b_train"]])
    train_y = np.concatenate([arrays["a_train_labels"], arrays["b_train_labels"]])
    clf = train_digit_classifier(torch.from_numpy(train_x), torch.from_numpy(train_y), epochs=p.classifier_epochs,
                                 seed=ctx.seed, num_classes=int(labels.max()) + 1)
    test_x = np.concatenate([arrays["a_test"], arrays["b_test"]])
    test_y = np.concatenate([arrays["a_test_labels"], arrays["b_test_labels"]])
    _, pred = classifier_features(clf, torch.from_numpy(test_x))
    accuracy = float((pred.numpy() == test_y).mean())
    ctx.log_metrics({"classifier_test_accuracy": accuracy})
    io.save_state(ctx.out_dir / "classifier.safetensors", clf.state_dict())
    io.save_arrays(ctx.out_dir / "series.npz", elnino=elnino_anomalies())
    io.write_json(ctx.out_dir / "meta.json", {
        "function_grids": p.function_grids, "image_size": p.image_size, "test_image_size": p.test_image_size,
        "channels": p.channels, "num_classes": int(labels.max()) + 1, "domain_b_classes": b_classes,
        "classifier_test_accuracy": accuracy,
        "n_images": {k: int(len(v)) for k, v in arrays.items() if not k.endswith(("_labels", "_high"))}})
