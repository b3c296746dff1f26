"""image_symmetry: the paper's image track on scikit-learn digits. Per seed: a small CNN trained without
augmentation (the feature extractor), generators learned on its feature-based validity score, their
correlation with rotation and scaling, and a classifier on few images with no / affine / learned
augmentation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core import Params, StageContext, io, stage

AFFINE = ["translate_x", "translate_y", "stretch_x", "stretch_y", "shear_x", "shear_y"]
METHODS = ("none", "affine", "learned")


class ImageSymmetryParams(Params):
    source: Literal["digits", "folder"] = Field(description="scikit-learn digits, or an image folder "
                                                            "(paper scale: CIFAR-10 as <data_dir>/<class>/<png>)")
    data_dir: str = Field(description="the image folder of source 'folder'")
    seeds: list[int] = Field(min_length=1)
    upsample: int = Field(ge=8, description="images are resized (digits: from 8 x 8) to this side ...")
    pad: int = Field(ge=0, description="... then zero-padded by this on every side")
    test_fraction: float = Field(gt=0, lt=1, description="held-out digits (validity, accuracy)")
    channels: int = Field(gt=0, description="first conv channels of the CNNs")
    feature_dim: int = Field(gt=0)
    extractor_epochs: int = Field(gt=0, description="epochs of the feature extractor (no augmentation)")
    n_generators: int = Field(gt=0)
    width: int = Field(gt=0)
    head_width: int = Field(gt=0)
    steps: int = Field(gt=0, description="Adam steps of the generator network")
    lr: float = Field(gt=0)
    batch: int = Field(gt=0)
    sigma: float = Field(gt=0, description="s ~ U(-sigma, sigma) per batch")
    rk4_steps: int = Field(gt=0)
    lipschitz_weight: float = Field(ge=0)
    lipschitz_tau: float = Field(gt=0)
    eval_step: float = Field(gt=0, description="|s| of the validity table (mean of +-s)")
    eval_images: int = Field(gt=0)
    n_random: int = Field(gt=0, description="random fields (random generator nets) per seed")
    n_small: int = Field(gt=0, description="training images of the augmented classifiers")
    classifier_epochs: int = Field(gt=0)
    classifier_lr: float = Field(gt=0)
    aug_scale: float = Field(gt=0, description="augmentation coefficients U(-scale, scale) per unit-RMS field")
    workers: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.source == "folder" and not self.data_dir:
            raise ValueError("source 'folder' needs 'data_dir'")
        if (self.upsample + 2 * self.pad) % 4:
            raise ValueError("upsample + 2 pad must be divisible by 4 (two 2x2 poolings)")
        return self


@dataclass(frozen=True)
class ImageJob:
    seed: int
    device: str
    params: dict
    train_seed: int  # the global seed + seed: another global seed draws other splits, nets and subsets


def load_images(p: ImageSymmetryParams):
    """(images (n, c, side, side) in [0, 1], zero-padded; labels (n,))."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    if p.source == "digits":
        from tasks.data.digits import load_digits_array

        x, y = load_digits_array(p.upsample)
        images = torch.from_numpy(x)[:, None]
    else:
        from PIL import Image

        from tasks.data.image_folder import list_image_folder

        paths, y, _ = list_image_folder(Path(p.data_dir))
        arrays = [np.asarray(Image.open(f).convert("RGB").resize((p.upsample, p.upsample)), dtype=np.float32)
                  for f in paths]
        images = torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).float()
    return F.pad(images, (p.pad,) * 4), torch.as_tensor(y)


def validity_table(extractor, images, fields: dict, p: ImageSymmetryParams) -> dict:
    import torch

    from models.symmetry_generators.images import feature_validity, flowed_grid, warp

    size = images.shape[-1]
    with torch.no_grad():
        return {name: float(sum(feature_validity(extractor, images, warp(images, flowed_grid(
                    f, size, s, p.rk4_steps, device=images.device)))
                                for s in (-p.eval_step, p.eval_step)) / 2) for name, f in fields.items()}


def image_seed(job: ImageJob) -> dict:
    import torch

    from models.symmetry_generators import images as I
    from tasks.data.digits import stratified_split

    p = ImageSymmetryParams.model_validate(job.params)
    device = torch.device(job.device)
    images, labels = load_images(p)
    images, labels = images.to(device), labels.to(device)
    split = stratified_split(labels.cpu().numpy(), {"test": p.test_fraction}, job.train_seed)
    train, test = torch.from_numpy(split["train"]).to(device), torch.from_numpy(split["test"]).to(device)
    size = images.shape[-1]
    gen = torch.Generator().manual_seed(job.train_seed)
    torch.manual_seed(job.train_seed)
    classes = int(labels.max()) + 1
    new_cnn = lambda: I.FeatureCNN(size, p.channels, p.feature_dim, classes, images.shape[1]).to(device)
    extractor = I.train_classifier(new_cnn(), images[train], labels[train], p.extractor_epochs, 64, 2e-3, gen)
    net = I.PlaneGeneratorNet(p.n_generators, p.width, p.head_width).to(device)
    cfg = I.PlaneTrainConfig(p.steps, p.lr, p.batch, p.sigma, p.rk4_steps, p.lipschitz_weight, p.lipschitz_tau)
    curve: list[float] = []
    I.fit_plane_generators(net, extractor, images[train], cfg, gen, on_step=lambda i, loss: curve.append(loss))
    learned = {f"learned{i}": net.field(i) for i in range(p.n_generators)}
    affine = I.affine_fields()
    randoms = {f"random{k}": I.PlaneGeneratorNet(1, p.width, p.head_width).to(device).field(0)
               for k in range(p.n_random)}
    grid = I.pixel_grid(size, device).reshape(-1, 2)
    unit = lambda f, norm: (lambda q: f(q) / norm)
    with torch.no_grad():
        norms = {n: float(f(grid).pow(2).sum(-1).mean().sqrt()) for n, f in (affine | randoms).items()}
    fields = {n: unit(f, norms[n]) for n, f in (affine | randoms).items()}
    table = validity_table(extractor, images[test[:p.eval_images]], fields | learned, p)
    corr = {n: {a: abs(I.field_correlation(f, affine[a], size, device)) for a in ("rotation", "scaling")}
            for n, f in learned.items()}
    small = train[torch.randperm(len(train), generator=gen)[:p.n_small]]
    augmenters = {"none": None,
                  "affine": I.flow_augmenter(I.affine_maker(AFFINE, size), len(AFFINE), p.aug_scale, p.rk4_steps),
                  "learned": I.flow_augmenter(net.combined, p.n_generators, p.aug_scale, p.rk4_steps)}
    accuracy = {}
    for method, augment in augmenters.items():
        torch.manual_seed(job.train_seed)
        clf = I.train_classifier(new_cnn(), images[small], labels[small], p.classifier_epochs, 32,
                                 p.classifier_lr, torch.Generator().manual_seed(job.train_seed), augment)
        with torch.no_grad():
            accuracy[method] = float((clf(images[test]).argmax(1) == labels[test]).float().mean())
    return {"seed": job.seed, "validity": table, "correlation": corr, "accuracy": accuracy, "curve": curve,
            "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


@stage(params=ImageSymmetryParams, gpu=True)
def image_symmetry(ctx: StageContext, p: ImageSymmetryParams) -> None:
    """Digits: feature-based validity, learned generators vs rotation/scaling, augmented classifiers."""
    jobs = [ImageJob(seed, str(ctx.device), p.model_dump(), ctx.seed + seed) for seed in p.seeds]

    def log(i, result):
        ctx.log_metrics({f"accuracy_{m}_seed{result['seed']}": v for m, v in result["accuracy"].items()})

    results = ctx.map(image_seed, jobs, workers=p.workers, desc="seeds", on_result=log)
    for result in results:
        io.save_state(ctx.out_dir / f"seed{result['seed']}/plane_generators.safetensors", result.pop("state"))
    io.write_json(ctx.out_dir / "results.json", {
        "seeds": p.seeds, "size": p.upsample + 2 * p.pad, "runs": results,
        "net": {"n_generators": p.n_generators, "width": p.width, "head_width": p.head_width}})
