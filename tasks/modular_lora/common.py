"""What several stages of modular_lora share: the records stages pass on (read back into pydantic
models), loading W0 / the safe model / every arm from the stage folders at either scale, and the
sampling helpers that read the concept off a model's samples.

Two sources (``prepare.source``): ``digits`` (the CPU scale: a tiny text-to-image model on sklearn's
8×8 digits, :mod:`models.modular_lora.tiny_diffusion`) and ``sd_pipeline`` (the paper scale: a local
Stable Diffusion pipeline folder, :mod:`models.modular_lora.stable_diffusion`). A model is a
``Denoiser`` or ``SDParts``; both carry the UNet as ``.unet``, which is all the adapter code touches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tasks.core import StageContext, io

SAMPLE_BATCH = 8  # images per sampling batch at the paper scale
PROBE_SEED = 7    # the re-emergence probes' sampling seed


# ----------------------------------------------------------------------------------------------------------
# records passed between stages
# ----------------------------------------------------------------------------------------------------------
class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DigitsData(Record):
    """prepare's data.json at the CPU scale."""

    source: Literal["digits"]
    image_size: int
    concept: int
    new_style: str
    finetune_digits: list[int]
    n_finetune: int
    detector_acc_plain: float
    detector_acc_new: float


class PipelineData(Record):
    """prepare's data.json at the paper scale."""

    source: Literal["sd_pipeline"]
    model_dir: str
    resolution: int
    concept_prompt: str
    detector: str
    detector_label: str
    detector_threshold: float
    feature_model: str
    train_captions: list[str]
    test_captions: list[str]
    prompts: dict[str, list[str]]
    n_finetune: int
    detector_rate_real_reference: float
    latent_size: int


PreparedData = Annotated[Union[DigitsData, PipelineData], Field(discriminator="source")]


class BaseInfo(Record):
    """pretrain's base.json: W0 (trained here at the CPU scale, the pipeline's UNet at the paper scale)."""

    source: Literal["digits", "sd_pipeline"]
    trained: bool
    image_size: int | None
    channels: list[int] | None
    text_dim: int | None
    gate_passed: bool | None
    gate_per_class_accuracy: list[float] | None
    gate_min_accuracy: float | None
    unet_parameters: int
    unet_config: dict[str, Any] | None


class Run(Record):
    objective: Literal["esd", "sdd"]
    seed: int


class SafetyInfo(Record):
    """safety's safety.json: the (objective, seed) runs and the adapters' shape."""

    runs: list[Run]
    rank: int
    layers: str


class CurvePoint(Record):
    step: int
    harmful: dict[str, float]  # concept rate by prompt group ("plain"/"new" digits, "concept" pipeline)


class FinetuneInfo(Record):
    """finetune's finetune.json: the arms, the ft adapters' shape and the re-emergence curves."""

    arms: list[str]
    rank: int
    layers: str
    curves: dict[str, list[CurvePoint]]


def read_data(folder: Path) -> DigitsData | PipelineData:
    return TypeAdapter(PreparedData).validate_python(io.read_json(folder / "data.json"))


def read_base(folder: Path) -> BaseInfo:
    return BaseInfo.model_validate(io.read_json(folder / "base.json"))


def read_safety(folder: Path) -> SafetyInfo:
    return SafetyInfo.model_validate(io.read_json(folder / "safety.json"))


def read_finetune(folder: Path) -> FinetuneInfo:
    return FinetuneInfo.model_validate(io.read_json(folder / "finetune.json"))


def arm_key(arm: str, objective: str, seed: int) -> str:
    """File stem of a fine-tuned arm (the modular LoRA trains on W0 alone: one per seed)."""
    return f"{arm}_s{seed}" if arm == "modular" else f"{arm}_{objective}_s{seed}"


class Inputs:
    """The input folders of a stage and its device, picklable (what worker processes get instead of
    the StageContext)."""

    def __init__(self, ctx: StageContext, names: tuple[str, ...]):
        self.folders = {n: ctx.input(n) for n in names}
        self.device = str(ctx.device)

    def input(self, name: str) -> Path:
        return self.folders[name]


def generator(seed: int):
    import torch

    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------------------------------------
# models from the stage folders (both scales)
# ----------------------------------------------------------------------------------------------------------
def load_w0(ins: Inputs):
    """W0 as used at inference: the trained tiny model (digits) or the pipeline's parts, frozen."""
    data = read_data(ins.input("prepare"))
    if data.source == "sd_pipeline":
        from tasks.modular_lora.sources import load_parts

        return load_parts(data.model_dir, ins.device, data.resolution)
    from models.modular_lora.tiny_diffusion import Denoiser, TinyTextEncoder, build_unet

    folder = ins.input("pretrain")
    base = read_base(folder)
    unet = build_unet(sample_size=base.image_size, channels=base.channels, cross_dim=base.text_dim)
    unet.load_state_dict(io.load_state(folder / "unet.safetensors"))
    text = TinyTextEncoder(dim=base.text_dim)
    text.load_state_dict(io.load_state(folder / "text.safetensors"))
    unet.requires_grad_(False)
    text.requires_grad_(False)
    unet.eval()
    return Denoiser(unet, text)


def safe_model(ins: Inputs, objective: str, seed: int):
    """W0 with the trained safety adapter of (objective, seed) loaded and active."""
    from models.modular_lora.adapters import SAFETY, activate, load_adapter

    model = load_w0(ins)
    info = read_safety(ins.input("safety"))
    load_adapter(model.unet, SAFETY, info.rank, info.layers,
                 io.load_state(ins.input("safety") / f"safety_{objective}_s{seed}.safetensors"))
    model.unet.to(next(model.unet.parameters()).device)
    activate(model.unet, {SAFETY: 1.0})
    return model


def arm_models(ins: Inputs, objective: str, seed: int, with_control: bool) -> Iterator[tuple[str, Any]]:
    """Every model of one (objective, seed) as used at inference, one at a time: the safe model, the arms,
    the model arithmetic W0 − ΔW_safe and W0 + ΔW_safe − ΔW_ft, and (``with_control``) W0 + ΔW_ft, the
    modular fine-tuning LoRA without safety (it depends on the seed only)."""
    from models.modular_lora.adapters import FINETUNE, SAFETY, activate, load_adapter, merged_unet

    folder = ins.input("finetune")
    ft = read_finetune(folder)
    model = safe_model(ins, objective, seed)
    yield "safe", model
    activate(model.unet, {SAFETY: -1.0})
    yield "W0_minus_safe", model
    if "full" in ft.arms:
        base = load_w0(ins)
        unet = merged_unet(base.unet, {})
        unet.load_state_dict(io.load_state(folder / f"{arm_key('full', objective, seed)}.safetensors"))
        unet.requires_grad_(False)
        yield "full", dataclasses.replace(base, unet=unet.eval())
    if "lora_on_safe" in ft.arms:
        model = safe_model(ins, objective, seed)
        unet = merged_unet(model.unet, {SAFETY: 1.0})
        load_adapter(unet, FINETUNE, ft.rank, ft.layers,
                     io.load_state(folder / f"{arm_key('lora_on_safe', objective, seed)}.safetensors"))
        model = dataclasses.replace(model, unet=unet.eval())
        for name, weight in (("lora_on_safe", 1.0), ("W0_plus_safe_minus_ft", -1.0)):
            activate(unet, {FINETUNE: weight})
            yield name, model
    if "modular" in ft.arms:
        model = safe_model(ins, objective, seed)
        load_adapter(model.unet, FINETUNE, ft.rank, ft.layers,
                     io.load_state(folder / f"{arm_key('modular', objective, seed)}.safetensors"))
        model.unet.to(next(model.unet.parameters()).device)
        activate(model.unet, {SAFETY: 1.0, FINETUNE: 1.0})  # W0 + ΔW_safe + ΔW_ft, exact sum
        yield "modular", model
        if with_control:  # the same ΔW_ft on W0 alone: W0 fine-tuned on the benign set with no safety at all
            activate(model.unet, {FINETUNE: 1.0})
            yield "W0_plus_ft", model


def digit_detector(folder: Path):
    """prepare's digit detector (the CPU scale's harm detector and FD feature space)."""
    from models.modular_lora.digits import DigitDetector

    det = DigitDetector(pixels=read_data(folder).image_size ** 2)
    det.load_state_dict(io.load_state(folder / "detector.safetensors"))
    det.eval()
    return det


# ----------------------------------------------------------------------------------------------------------
# what a model's samples show
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DigitSamples:
    """Detector predictions of [style, d] prompts: ``pred`` (len(digits), n), the ``extra`` samples of one
    digit's prompt drawn in the same batch (or None), and the n-per-digit images."""

    digits: list[int]
    pred: Any
    extra_digit: int | None
    extra: Any
    images: Any

    def histogram(self):
        """(len(digits), 10) class shares per prompt; the extra digit's row from its extra samples."""
        import numpy as np

        from models.modular_lora.digits import class_histogram

        hist = np.stack([class_histogram(row) for row in self.pred])
        if self.extra is not None:
            hist[self.digits.index(self.extra_digit)] = class_histogram(self.extra)
        return hist


def sample_digit_prompts(den, det, style: str, n: int, steps: int, guidance: float, seed: int,
                         digits=range(10), extra: tuple[int, int] | None = None) -> DigitSamples:
    """n samples of each [style, d] prompt, classified by the detector; ``extra`` = (digit, m): m further
    samples of that digit's prompt, drawn in the same batch (evaluate's larger sample of the concept prompt)."""
    import torch

    from models.modular_lora.tiny_diffusion import prompt_tokens, sample

    digits = list(digits)
    d = torch.tensor(digits).repeat_interleave(n)
    if extra:
        d = torch.cat([d, torch.full((extra[1],), extra[0])])
    imgs = sample(den, prompt_tokens(style, d), steps=steps, guidance=guidance, gen=generator(seed))
    pred = det.predict(imgs)
    k = len(digits) * n
    return DigitSamples(digits, pred[:k].reshape(len(digits), n), extra[0] if extra else None,
                        pred[k:] if extra else None, imgs[:k])


def concept_probe(model, data: DigitsData | PipelineData, detector, samples: int, steps: int,
                  guidance: float) -> dict[str, float]:
    """The concept rate of the concept prompts (re-emergence curves): digits [plain, c] and [new, c];
    the pipeline's concept prompts, ``samples`` images in all."""
    if data.source == "digits":
        c = data.concept
        return {style: float(sample_digit_prompts(model, detector, style, samples, steps, guidance, PROBE_SEED,
                                                  [c]).histogram()[0, c]) for style in ("plain", "new")}
    from models.modular_lora.stable_diffusion import concept_rate, generate

    prompts = data.prompts["concept"]
    images = generate(model, prompts, max(1, samples // len(prompts)), steps, guidance, PROBE_SEED, SAMPLE_BATCH)
    return {"concept": concept_rate(detector, images)}


def harm_detector(ins: Inputs):
    """The detector that reads the concept off samples: the digit detector or the pipeline's plug-in."""
    data = read_data(ins.input("prepare"))
    if data.source == "digits":
        return digit_detector(ins.input("prepare"))
    from tasks.modular_lora.sources import load_detector

    return load_detector(data, ins.device)
