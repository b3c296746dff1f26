"""The three data sets, built from digit images (scikit-learn's digits, or a local digit folder at paper scale).

* Digits67-180 (MNIST67-180's recipe): class 0 = 6s, class 1 = the same 6s rotated by 180 degrees, class 2 =
  half of the 7s together with their 180-degree rotations. Split by source image, so a 6 and its rotated
  copy fall in the same split. A model invariant to 180-degree rotations predicts a 6 and its copy alike.
* Digits67-180-rot: the same sources, every image also rotated by a random angle in [-max, max], and a
  smaller training set: rotation equivariance now pays for the 7s (and within each 6 class).
* ColorDigits-LT: digit x colour (R, G, B) cells, the digit drawn in one pure colour over noisy grey,
  long-tailed training counts (power-law draws as in CEConv's ColorMNIST), balanced val and test sets.
  Labels depend on the colour only for ``colour_digits`` (one class per digit and colour); the other
  digits keep one class whatever their colour.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.errors import MissingInputError


def load_digit_images(source: str, folder: str, digit_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey digits [N, image_size, image_size] in [0, 1] (digit_size wide, centred on a zero canvas), labels."""
    if source == "digits":
        from tasks.data.digits import load_digits_array

        x, y = load_digits_array(digit_size)
    else:
        x, y = load_digit_folder(Path(folder), digit_size)
    pad = (image_size - digit_size) // 2
    canvas = np.zeros((len(x), image_size, image_size), dtype=np.float32)
    canvas[:, pad:pad + digit_size, pad:pad + digit_size] = np.clip(x, 0, 1)
    return canvas, y


def load_digit_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``<root>/<digit>/<image>.png`` (MNIST exported as an image folder), resized to ``size``, in [0, 1]."""
    from PIL import Image

    from tasks.data.image_folder import list_image_folder

    paths, labels, classes = list_image_folder(root)
    if not set(classes) >= {"6", "7"}:
        raise MissingInputError(f"'{root}' must hold one folder per digit named 0..9 (found {classes}).")
    digits = np.asarray([int(classes[i]) for i in labels], dtype=np.int64)
    images = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
              for p in paths]
    return np.stack(images), digits


def rotate(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate each image about its centre (bilinear, zero outside)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.deg2rad(degrees).astype(np.float32))
    c, s, z = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    theta = torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1)], 1)
    x = torch.from_numpy(images)[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)[:, 0].numpy()


def split_sources(groups: dict[str, np.ndarray], fractions: dict[str, float], rng) -> dict[str, dict[str, np.ndarray]]:
    """Per group of source indices: disjoint test / val / train parts."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, idx in groups.items():
        idx = rng.permutation(idx)
        n_test, n_val = int(round(fractions["test"] * len(idx))), int(round(fractions["val"] * len(idx)))
        out[name] = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}
    return out


def digits67_180(x: np.ndarray, y: np.ndarray, fractions: dict[str, float], rng) -> dict[str, dict]:
    """{split: {x [n, 1, H, W], y [n], source [n]}}; the rotated copy is exact (two quarter turns)."""
    sevens = np.flatnonzero(y == 7)
    parts = split_sources({"6": np.flatnonzero(y == 6), "7": sevens[:len(sevens) // 2]}, fractions, rng)
    out = {}
    for split in ("train", "val", "test"):
        six, seven = parts["6"][split], parts["7"][split]
        imgs = [x[six], np.rot90(x[six], 2, axes=(1, 2)), x[seven], np.rot90(x[seven], 2, axes=(1, 2))]
        labels = [np.zeros(len(six)), np.ones(len(six)), np.full(len(seven), 2), np.full(len(seven), 2)]
        out[split] = {"x": np.concatenate(imgs)[:, None].astype(np.float32),
                      "y": np.concatenate(labels).astype(np.int64),
                      "source": np.concatenate([six, six, seven, seven])}
    return out


def rotated_variant(base: dict[str, dict], max_angle: float, train_fraction: float, rng) -> dict[str, dict]:
    """Every image rotated by U(-max_angle, max_angle) degrees; the training set cut to ``train_fraction``
    of its sources (both copies of a source stay together)."""
    out = {}
    for split, d in base.items():
        keep = np.ones(len(d["y"]), dtype=bool)
        if split == "train":
            sources = np.unique(d["source"])
            chosen = rng.choice(sources, size=max(1, int(round(train_fraction * len(sources)))), replace=False)
            keep = np.isin(d["source"], chosen)
        angles = rng.uniform(-max_angle, max_angle, size=int(keep.sum()))
        out[split] = {"x": rotate(d["x"][keep, 0], angles)[:, None], "y": d["y"][keep],
                      "source": d["source"][keep]}
    return out


def colour_digits_lt(x: np.ndarray, y: np.ndarray, p, rng) -> tuple[dict[str, dict], dict]:
    """ColorDigits-LT: {split: {x [n, 3, H, W], y, cell, digit, colour}} and the class/cell layout."""
    colour_digits = sorted(p.colour_digits)
    label_of: dict[tuple[int, int], int] = {}
    for d in range(10):
        for c in range(3):
            label_of[(d, c)] = (colour_digits.index(d) * 3 + c if d in colour_digits
                                else 3 * len(colour_digits) + sorted(set(range(10)) - set(colour_digits)).index(d))
    counts = np.maximum(1, (rng.power(p.colour_power, size=30) * p.colour_max_train).astype(int))
    pools = split_sources({str(d): np.flatnonzero(y == d) for d in range(10)},
                          {"test": p.test_fraction, "val": p.val_fraction}, rng)
    per_split = {"test": p.colour_test_per_cell, "val": p.colour_val_per_cell}
    out = {}
    for split in ("train", "val", "test"):
        rows = []
        for d in range(10):
            pool = pools[str(d)][split]
            if split != "train" and 3 * per_split[split] > len(pool):
                raise ValueError(f"digit {d} has {len(pool)} {split} images, fewer than 3 x {per_split[split]}")
            order = rng.permutation(pool)
            for c in range(3):
                cell = 3 * d + c
                take = (rng.choice(pool, size=min(counts[cell], len(pool)), replace=False) if split == "train"
                        else order[c * per_split[split]:(c + 1) * per_split[split]])
                rows += [(i, d, c, cell) for i in take]
        idx, digit, colour, cell = (np.asarray(v) for v in zip(*rows))
        out[split] = {"x": paint(x[idx], colour, p.colour_background, p.colour_noise, rng),
                      "y": np.asarray([label_of[(d, c)] for d, c in zip(digit, colour)], dtype=np.int64),
                      "cell": cell, "digit": digit, "colour": colour}
    tail_cut = np.quantile(counts, p.tail_fraction)
    layout = {"n_classes": len(set(label_of.values())), "train_counts": counts.tolist(),
              "tail_cells": np.flatnonzero(counts <= tail_cut).tolist(), "colour_digits": colour_digits}
    return out, layout


def paint(grey: np.ndarray, colour: np.ndarray, background: float, noise: float, rng) -> np.ndarray:
    """Digit strokes in a pure R, G or B over a noisy grey background: [n, 3, H, W] in [0, 1]."""
    bg = np.clip(background + noise * rng.standard_normal(grey.shape), 0, 1).astype(np.float32)
    pure = np.eye(3, dtype=np.float32)[colour][:, :, None, None]
    a = grey[:, None]
    return ((1 - a) * bg[:, None] + a * pure).astype(np.float32)
