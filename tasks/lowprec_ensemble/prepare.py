"""prepare: stratified train/val/test splits of digits (CPU) or of a local image folder (paper)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage


class PrepareParams(Params):
    source: Literal["digits", "image_folder"] = Field(description="digits (CPU) or a local image folder")
    image_folder: str | None = Field(description="paper scale: <folder>/<class>/<image>")
    model_dir: str | None = Field(description="paper scale: folder with the image processor config")
    max_per_class: int | None = Field(gt=0, description="paper scale: cap on images per class")
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _paths(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a training split (< 1)")
        if self.source == "image_folder" and not (self.image_folder and self.model_dir):
            raise ValueError("source 'image_folder' needs 'image_folder' and 'model_dir'")
        return self


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Stratified train/val/test splits of digits (or of a local image folder)."""
    from tasks.data.digits import load_digits_array, stratified_split

    if p.source == "digits":
        x, y = load_digits_array()
        x = x.reshape(len(x), -1)
        classes = [str(i) for i in range(10)]
    else:
        from tasks.data.image_folder import load_image_folder

        x, y, classes = load_image_folder(Path(p.image_folder), Path(p.model_dir), p.max_per_class)
    splits = stratified_split(y, {"test": p.test_fraction, "val": p.val_fraction}, ctx.seed)
    io.save_arrays(ctx.out_dir / "data.npz", **{f"x_{k}": x[v] for k, v in splits.items()},
                   **{f"y_{k}": y[v] for k, v in splits.items()})
    io.write_json(ctx.out_dir / "meta.json", {"classes": classes, "source": p.source,
                                              **{f"n_{k}": len(v) for k, v in splits.items()}})
