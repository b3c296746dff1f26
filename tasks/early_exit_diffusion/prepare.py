"""prepare: class-conditional training images (or latents), a held-out split, the FD-proxy classifier."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError
from tasks.early_exit_diffusion.data import PreparedMeta


class PrepareParams(Params):
    source: Literal["digits", "latents"] = Field(
        description="digits (CPU scale) or a local .npz of VAE latents 'x' [N,C,H,W] and labels 'y' (paper)")
    latents_path: str | None = Field(description="paper scale: .npz with arrays x (latents x 0.18215) and y")
    image_size: int = Field(ge=8, description="digits are upsampled from 8x8 to this size")
    test_fraction: float = Field(gt=0, lt=0.5, description="held-out real images for the FD-proxy")
    max_images: int | None = Field(gt=0, description="cap on images (smoke scale); null: all")
    classifier_epochs: int = Field(gt=0, description="epochs of the feature classifier (FD-proxy)")

    @model_validator(mode="after")
    def _paths(self):
        if self.source == "latents" and not self.latents_path:
            raise ValueError("source 'latents' needs 'latents_path'")
        if self.image_size % 4:
            raise ValueError("image_size must be divisible by 4")
        return self


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Class-conditional training images in [-1, 1], a held-out split, and the FD-proxy classifier."""
    import torch

    from tasks.data.digit_features import classifier_features, train_digit_classifier
    from tasks.data.digits import stratified_split
    from tasks.metrics import frechet_distance

    x, y = _load_images(ctx, p)
    splits = stratified_split(y, {"test": p.test_fraction}, ctx.seed)
    xt, yt = torch.from_numpy(x[splits["train"]]), torch.from_numpy(y[splits["train"]])
    xe, ye = torch.from_numpy(x[splits["test"]]), torch.from_numpy(y[splits["test"]])

    clf = train_digit_classifier(xt, yt, epochs=p.classifier_epochs, seed=ctx.seed, num_classes=int(y.max()) + 1)
    f_train, _ = classifier_features(clf, xt)
    f_test, pred = classifier_features(clf, xe)
    acc = float((pred == ye).float().mean())
    floor = frechet_distance(f_train.numpy(), f_test.numpy())
    ctx.log_metrics({"classifier_test_accuracy": acc, "fd_proxy_floor": floor})

    io.save_state(ctx.out_dir / "classifier.safetensors", clf.state_dict())
    io.save_arrays(ctx.out_dir / "data.npz", x_train=xt.numpy(), y_train=yt.numpy(), x_test=xe.numpy(),
                   y_test=ye.numpy())
    meta = PreparedMeta(source=p.source, shape=list(x.shape[1:]), num_classes=int(y.max()) + 1,
                        n_train=len(yt), n_test=len(ye), classifier_test_accuracy=acc, fd_proxy_floor=floor,
                        pixel_range=[-1.0, 1.0] if p.source == "digits" else None)
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump(mode="json"))


def _load_images(ctx: StageContext, p: PrepareParams) -> tuple[np.ndarray, np.ndarray]:
    """Digits in [-1, 1] as [N, 1, S, S] (CPU scale) or the latents file (paper scale), capped."""
    if p.source == "digits":
        from tasks.data.digits import load_digits_array

        x, y = load_digits_array(p.image_size)
        x = x[:, None] * 2.0 - 1.0
    else:
        path = Path(p.latents_path)
        if not path.is_file():
            raise MissingInputError(f"'{ctx.paper}.prepare.latents_path' = '{path}' does not exist. Encode the "
                                    f"ImageNet train folder with the SD VAE (see docs/{ctx.paper}.md) into an "
                                    f".npz with arrays x (latents x 0.18215) and y.")
        arrays = io.load_arrays(path)
        x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if p.max_images:
        keep = np.sort(np.random.default_rng(ctx.seed).permutation(len(y))[: p.max_images])
        x, y = x[keep], y[keep]
    return x, y
