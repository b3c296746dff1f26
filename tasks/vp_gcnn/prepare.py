"""prepare: Digits67-180, its rotated variant and ColorDigits-LT from digit images."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage

from .common import DATASETS, data_file


class PrepareParams(Params):
    source: Literal["digits", "folder"] = Field(description="scikit-learn digits (CPU) or a local digit folder")
    folder: str = Field(description="paper scale: <folder>/<digit 0-9>/<image>.png (MNIST as an image folder)")
    digit_size: int = Field(gt=3, description="side the digit is resized to")
    image_size: int = Field(gt=3, description="side of the zero canvas the digit is centred on (room to rotate)")
    val_fraction: float = Field(gt=0, lt=0.5, description="fraction of source images for validation")
    test_fraction: float = Field(gt=0, lt=0.7, description="fraction of source images for test")
    rotated_max_angle: float = Field(ge=0, le=90, description="rotated variant: angles U(-max, max) degrees")
    rotated_train_fraction: float = Field(gt=0, le=1, description="rotated variant: training sources kept")
    colour_digits: list[int] = Field(min_length=1, description="digits whose label depends on the colour")
    colour_max_train: int = Field(gt=0, description="largest training count of a digit x colour cell")
    colour_power: float = Field(gt=0, description="cell counts = max_train * power(a) draws (CEConv: 0.3)")
    colour_val_per_cell: int = Field(gt=0)
    colour_test_per_cell: int = Field(gt=0)
    colour_background: float = Field(ge=0, le=1, description="grey level of the background")
    colour_noise: float = Field(ge=0, description="std of the background noise")
    tail_fraction: float = Field(gt=0, lt=1, description="tail cells: training count at or below this quantile")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "folder" and not self.folder:
            raise ValueError("source 'folder' needs 'folder'")
        if self.digit_size > self.image_size:
            raise ValueError("digit_size must not exceed image_size")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave a training split")
        if any(d not in range(10) for d in self.colour_digits) or len(set(self.colour_digits)) == 10:
            raise ValueError("colour_digits must be distinct digits 0-9, and not all ten")
        return self


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Digits67-180 (6 / 6 rotated 180 / 7 with its rotation), its randomly rotated variant, ColorDigits-LT."""
    from .data import colour_digits_lt, digits67_180, load_digit_images, rotated_variant

    x, y = load_digit_images(p.source, p.folder, p.digit_size, p.image_size)
    rng = np.random.default_rng(ctx.seed)
    fractions = {"test": p.test_fraction, "val": p.val_fraction}
    sets = {"digits67": digits67_180(x, y, fractions, rng)}
    sets["rotated"] = rotated_variant(sets["digits67"], p.rotated_max_angle, p.rotated_train_fraction, rng)
    sets["colour"], layout = colour_digits_lt(x, y, p, rng)
    assert set(sets) == set(DATASETS)
    sizes = {}
    for name, splits in sets.items():
        io.save_arrays(ctx.out_dir / data_file(name), **{f"{k}_{split}": v for split, d in splits.items()
                                                          for k, v in d.items()})
        sizes[name] = {split: int(len(d["y"])) for split, d in splits.items()}
        ctx.log_metrics({f"n_train_{name}": sizes[name]["train"]})
    test = sets["digits67"]["test"]
    n6, n7 = int((test["y"] == 0).sum()), int((test["y"] == 2).sum())
    meta = {"source": p.source, "sizes": sizes, "image_size": p.image_size,
            "n_classes": {"digits67": 3, "rotated": 3, "colour": layout["n_classes"]},
            "invariant_ceiling": (n6 + n7) / (2 * n6 + n7), "colour_layout": layout}
    io.write_json(ctx.out_dir / "meta.json", meta)
