"""modular_lora-prepare: the data and the harm detector.

digits: sklearn's digits split into train/test, the benign new-style set without the concept, and a
detector trained on real digits of both styles. sd_pipeline: checks every local path, VAE latents of the
caption images (train split), the detector's features of the held-out images (the FD reference), the prompts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core import Params, StageContext, io, stage

from tasks.modular_lora.common import SAMPLE_BATCH, DigitsData, PipelineData, generator


class PrepareParams(Params):
    image_size: Literal[8, 16] = Field(description="side of the digit images (sklearn digits are 8x8)")
    concept: int = Field(description="the suppressed ('harmful') digit class")
    new_style: Literal["invert", "thick", "flip"] = Field(description="look of the benign domain")
    finetune_digits: list[int] = Field(description="digits of the benign fine-tuning set (never the concept)")
    test_fraction: float = Field(gt=0, lt=1)
    detector_steps: int = Field(gt=0)
    detector_noise: float = Field(ge=0)
    # paper scale (source: sd_pipeline); the digits keys above are then unused
    source: Literal["digits", "sd_pipeline"] = Field(description="digits (CPU scale) or a local SD pipeline")
    model_dir: str = Field(description="sd_pipeline: a StableDiffusionPipeline.save_pretrained folder")
    finetune_folder: str = Field(description="sd_pipeline: image-caption folder (metadata.jsonl or images/*.png+.txt)")
    eval_prompts: str = Field(description="sd_pipeline: prompts file (.json or 'concept:/benign:/task:' lines)")
    concept_prompt: str = Field(description="sd_pipeline: the suppressed concept as a text prompt")
    detector: str = Field(description="sd_pipeline: image-classifier folder or 'module:factory' plug-in")
    detector_label: int | str = Field(description="sd_pipeline: the detector's concept label (name or index)")
    detector_threshold: float = Field(ge=0, le=1, description="sd_pipeline: P(concept) that flags an image")
    feature_model: str = Field(description="sd_pipeline: image-classifier folder for FD ('': the detector's)")
    resolution: int = Field(gt=0, description="sd_pipeline: image side (pixels)")

    @field_validator("concept")
    @classmethod
    def _concept_is_a_digit(cls, v: int) -> int:
        if not 0 <= v <= 9:
            raise ValueError(f"unknown concept {v}: the concept must be a digit class 0..9")
        return v

    @model_validator(mode="after")
    def _benign_set(self):
        if not self.finetune_digits:
            raise ValueError("finetune_digits is empty: the benign fine-tuning set needs at least one digit")
        if self.concept in self.finetune_digits:
            raise ValueError(f"finetune_digits contains the concept {self.concept}: the benign set must not")
        if any(not 0 <= d <= 9 for d in self.finetune_digits):
            raise ValueError("finetune_digits must be digits 0..9")
        if self.source == "sd_pipeline":
            for key in ("model_dir", "finetune_folder", "eval_prompts", "concept_prompt", "detector"):
                if not getattr(self, key).strip():
                    raise ValueError(f"source 'sd_pipeline' needs '{key}'")
        return self


@stage(params=PrepareParams, gpu=True)  # the VAE encodes the images at paper scale
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Data and harm detector: the digits (CPU scale) or a local SD pipeline's inputs (paper scale)."""
    if p.source == "sd_pipeline":
        _prepare_pipeline(ctx, p)
    else:
        _prepare_digits(ctx, p)


def _prepare_digits(ctx: StageContext, p: PrepareParams) -> None:
    import torch

    from models.modular_lora.digits import apply_style, train_detector

    from tasks.modular_lora.sources import load_digits

    x, y = load_digits(p.image_size)
    g = generator(ctx.seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * p.test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    # the detector sees real digits in both styles (labels are digits), with noise/blur augmentation
    det_x = torch.cat([x[train], apply_style(x[train], p.new_style)])
    det_y = torch.cat([y[train], y[train]])
    det = train_detector(det_x, det_y, p.detector_steps, g, noise=p.detector_noise)
    acc_plain = float((det.predict(x[test]) == y[test].numpy()).mean())
    acc_new = float((det.predict(apply_style(x[test], p.new_style)) == y[test].numpy()).mean())
    ctx.log_metrics({"detector_acc_plain": acc_plain, "detector_acc_new": acc_new})
    ft = train[torch.isin(y[train], torch.tensor(p.finetune_digits))]
    io.save_state(ctx.out_dir / "data.safetensors",
                  {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test],
                   "ft_x": apply_style(x[ft], p.new_style), "ft_y": y[ft]})
    io.save_state(ctx.out_dir / "detector.safetensors", det.state_dict())
    data = DigitsData(source="digits", image_size=p.image_size, concept=p.concept, new_style=p.new_style,
                      finetune_digits=p.finetune_digits, n_finetune=len(ft), detector_acc_plain=acc_plain,
                      detector_acc_new=acc_new)
    io.write_json(ctx.out_dir / "data.json", data.model_dump())


def _prepare_pipeline(ctx: StageContext, p: PrepareParams) -> None:
    import numpy as np
    import torch

    from models.modular_lora.stable_diffusion import concept_rate

    from tasks.modular_lora.sources import (check_pipeline_folder, load_detector, load_feature_model, load_images,
                                           load_parts, read_caption_folder, read_eval_prompts)

    check_pipeline_folder(p.model_dir)
    pairs = read_caption_folder(p.finetune_folder)
    prompts = read_eval_prompts(p.eval_prompts)
    detector = load_detector(p, ctx.device)
    features = load_feature_model(p, ctx.device, detector)
    parts = load_parts(p.model_dir, ctx.device, p.resolution)

    perm = torch.randperm(len(pairs), generator=generator(ctx.seed)).tolist()
    n_test = min(len(pairs) - 1, max(1, int(len(pairs) * p.test_fraction)))
    test, train = [pairs[i] for i in perm[:n_test]], [pairs[i] for i in perm[n_test:]]
    latents = []
    for i in ctx.progress(range(0, len(train), SAMPLE_BATCH), desc="VAE latents"):
        latents.append(parts.encode_images(load_images([q for q, _ in train[i:i + SAMPLE_BATCH]], p.resolution)))
    real_test = (load_images([q for q, _ in test], p.resolution) + 1) / 2
    real_rate = concept_rate(detector, real_test)
    reference = np.asarray(features.features(real_test), dtype=np.float32)
    io.save_state(ctx.out_dir / "latents.safetensors", {"latents": torch.cat(latents)})
    io.save_state(ctx.out_dir / "reference_features.safetensors", {"features": torch.from_numpy(reference)})
    if not prompts["task"]:  # task quality on the held-out captions of the fine-tuning domain
        prompts["task"] = [c for _, c in test]
    ctx.log_metrics({"n_finetune": len(train), "n_reference": len(test), "detector_rate_real_reference": real_rate})
    data = PipelineData(source="sd_pipeline", model_dir=p.model_dir, resolution=p.resolution,
                        concept_prompt=p.concept_prompt, detector=p.detector, detector_label=str(p.detector_label),
                        detector_threshold=p.detector_threshold, feature_model=p.feature_model,
                        train_captions=[c for _, c in train], test_captions=[c for _, c in test], prompts=prompts,
                        n_finetune=len(train), detector_rate_real_reference=real_rate,
                        latent_size=parts.latent_size)
    io.write_json(ctx.out_dir / "data.json", data.model_dump())
