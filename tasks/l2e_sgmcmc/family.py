"""Classification tasks built in code from scikit-learn: the meta-training family and the held-out tasks.

A task is a dataset split train / validation / test (stratified; inputs standardised on the training
part) and a network. Meta-training draws a new task each iteration: digits (all classes, a random 5-class
subset, or a fixed random pixel permutation) or make_moons / make_circles / make_classification, with an
MLP from widths x depths x activations. At paper scale the datasets are local ``npz:<name>`` files
(``<data_dir>/<name>.npz`` with images ``x`` and labels ``y``) and the networks CNNs (width x depth x
residual) or ResNet-FRN-Swish.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class TaskArrays:
    name: str
    hidden: tuple[int, ...]
    activation: str
    arrays: dict[str, np.ndarray]      # x_train, y_train, x_val, y_val, x_test, y_test
    arch: str = "mlp"                  # mlp | cnn | resnet_frn (hidden = [width] * depth)
    residual: bool = False

    @property
    def n_classes(self) -> int:
        return int(self.arrays["y_train"].max()) + 1

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.arrays["x_train"].shape[1], *self.hidden, self.n_classes)

    def spec(self):
        """The task network: an MLPSpec, or a ModuleSpec for convolutional nets (paper scale)."""
        from models.l2e_sgmcmc.convnets import module_spec
        from models.l2e_sgmcmc.network import MLPSpec

        if self.arch == "mlp":
            return MLPSpec(self.sizes, self.activation)
        return module_spec(self.arch, self.arrays["x_train"].shape[1], self.n_classes, self.hidden[0],
                           len(self.hidden), self.residual)


def local_images(path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float, and ``y`` of a local .npz file, as
    float32 (N, C, H, W) in [0, 1] and int64 labels."""
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"paper-scale data file '{path}' is missing (see docs/l2e_sgmcmc.md)")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"].reshape(-1).astype(np.int64)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), y


def dataset(kind: str, rng: np.random.Generator, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [n, ...], y int64 [n]) of one dataset kind; random variants draw from ``rng``."""
    from pathlib import Path

    from sklearn import datasets

    if kind.startswith("npz:"):
        return local_images(Path(data_dir) / f"{kind[4:]}.npz")

    if kind in ("digits", "digits_subset", "digits_permuted"):
        d = datasets.load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        if kind == "digits_subset":
            classes = np.sort(rng.choice(10, size=5, replace=False))
            keep = np.isin(y, classes)
            x, y = x[keep], np.searchsorted(classes, y[keep])
        elif kind == "digits_permuted":
            x = x[:, rng.permutation(x.shape[1])]
        return x, y
    if kind in ("wine", "breast_cancer"):
        d = datasets.load_wine() if kind == "wine" else datasets.load_breast_cancer()
        return d.data.astype(np.float32), d.target.astype(np.int64)
    seed = int(rng.integers(2**31))
    n = int(rng.integers(200, 601))
    if kind == "moons":
        x, y = datasets.make_moons(n, noise=float(rng.uniform(0.1, 0.3)), random_state=seed)
    elif kind == "circles":
        x, y = datasets.make_circles(n, noise=float(rng.uniform(0.05, 0.15)), factor=0.5, random_state=seed)
    elif kind == "classification":
        features = int(rng.integers(2, 21))
        classes = int(rng.integers(2, 5))
        x, y = datasets.make_classification(n, n_features=features, n_informative=max(2, features // 2),
                                            n_redundant=0, n_classes=classes, n_clusters_per_class=1,
                                            random_state=seed)
    else:
        raise ValueError(f"unknown dataset kind '{kind}'")
    return x.astype(np.float32), y.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train / val / test split; inputs standardised with the training mean and std."""
    from tasks.data.digits import stratified_split

    idx = stratified_split(y, {"test": test, "val": val}, seed)
    mean, std = x[idx["train"]].mean(0), x[idx["train"]].std(0) + 1e-6
    return {f"{a}_{s}": (((x[idx[s]] - mean) / std).astype(np.float32) if a == "x" else y[idx[s]])
            for s in SPLIT_NAMES for a in ("x", "y")}


def family_task(rng: np.random.Generator, family: dict, val: float, test: float, data_dir: str = "") -> TaskArrays:
    """One draw from the meta-training family (prepare's ``family`` section)."""
    kind = str(rng.choice(family["datasets"]))
    x, y = dataset(kind, rng, data_dir)
    width, depth = int(rng.choice(family["widths"])), int(rng.choice(family["depths"]))
    activation, arch = str(rng.choice(family["activations"])), str(rng.choice(family["archs"]))
    residual = bool(rng.choice(family["residual"]))
    arrays = split(x, y, val, test, int(rng.integers(2**31)))
    name = f"{kind.replace(':', '_')}_{arch}_w{width}_d{depth}_{activation}{'_res' if residual else ''}"
    return TaskArrays(name, (width,) * depth, activation, arrays, arch, residual)


def save_task(folder, task: TaskArrays) -> dict:
    from tasks.core import io

    io.save_arrays(folder / f"{task.name}.npz", **task.arrays)
    return {"name": task.name, "hidden": list(task.hidden), "activation": task.activation, "arch": task.arch,
            "residual": task.residual}


def load_task(folder, entry: dict) -> TaskArrays:
    from tasks.core import io

    return TaskArrays(entry["name"], tuple(entry["hidden"]), entry["activation"],
                      io.load_arrays(folder / f"{entry['name']}.npz"), entry["arch"], entry["residual"])
