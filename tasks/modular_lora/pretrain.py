"""modular_lora-pretrain: W0.

digits: W0 and the frozen text encoder trained on the plain digits (shared by every seed), with a quality
gate on the detector's per-class accuracy of W0's samples. sd_pipeline: W0 is the pipeline's UNet; it is
loaded through the same code path and recorded, nothing is trained.
"""
from __future__ import annotations

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from tasks.modular_lora.common import (BaseInfo, Inputs, digit_detector, generator, load_w0, read_data,
                                       sample_digit_prompts)


class PretrainParams(Params):
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch: int = Field(gt=0)
    channels: list[int] = Field(min_length=2, max_length=2)
    text_dim: int = Field(gt=0, description="width of the text encoder = UNet cross-attention dim")
    null_prob: float = Field(ge=0, lt=1, description="prompt dropout to NULL for guidance")
    ema_decay: float = Field(gt=0, lt=1)
    gate_samples: int = Field(gt=0, description="samples per digit for the quality gate")
    gate_min_accuracy: float = Field(ge=0, le=1, description="every class's detector accuracy must pass")
    ddim_steps: int = Field(gt=0)
    guidance: float = Field(ge=1, description="classifier-free guidance scale (>= 1)")


@stage(params=PretrainParams, inputs=("prepare",), gpu=True)
def pretrain(ctx: StageContext, p: PretrainParams) -> None:
    """W0: trained on the digits with a per-class quality gate, or the SD pipeline's UNet as it is."""
    if read_data(ctx.input("prepare")).source == "sd_pipeline":
        _record_pipeline(ctx)
    else:
        _train_digits(ctx, p)


def _train_digits(ctx: StageContext, p: PretrainParams) -> None:
    import numpy as np
    import torch

    from models.modular_lora import tiny_diffusion as td

    src = ctx.input("prepare")
    data, meta = io.load_state(src / "data.safetensors"), read_data(src)
    det = digit_detector(src)
    torch.manual_seed(ctx.seed)
    den = td.Denoiser(td.build_unet(sample_size=meta.image_size, channels=p.channels, cross_dim=p.text_dim),
                      td.TinyTextEncoder(dim=p.text_dim))
    it = iter(ctx.progress(range(p.steps), desc="pretrain W0"))

    def log(step: int, loss: float) -> None:
        next(it, None)
        if step % 50 == 0:
            ctx.log_metrics({"pretrain_loss": loss}, step=step)

    unet = td.pretrain(den, data["train_x"], td.prompt_tokens("plain", data["train_y"]), p.steps, p.lr, p.batch,
                       generator(ctx.seed), null_prob=p.null_prob, ema_decay=p.ema_decay, on_step=log)
    unet.eval()
    # quality gate: every digit recognisable in W0's samples
    samples = sample_digit_prompts(den, det, "plain", p.gate_samples, p.ddim_steps, p.guidance, ctx.seed + 1)
    per_class = np.diag(samples.histogram())
    ctx.log_metrics({"gate_min_class_accuracy": float(per_class.min()),
                     "gate_mean_accuracy": float(per_class.mean())})
    io.save_state(ctx.out_dir / "unet.safetensors", unet.state_dict())
    io.save_state(ctx.out_dir / "text.safetensors", den.text.state_dict())
    info = BaseInfo(source="digits", trained=True, image_size=meta.image_size, channels=p.channels,
                    text_dim=p.text_dim, gate_passed=bool(per_class.min() >= p.gate_min_accuracy),
                    gate_per_class_accuracy=per_class.round(4).tolist(), gate_min_accuracy=p.gate_min_accuracy,
                    unet_parameters=sum(q.numel() for q in unet.parameters()), unet_config=None)
    io.write_json(ctx.out_dir / "base.json", info.model_dump())


def _record_pipeline(ctx: StageContext) -> None:
    """W0 is the pipeline's UNet: load it through the same code path and record what it is."""
    parts = load_w0(Inputs(ctx, ("prepare",)))
    n = sum(q.numel() for q in parts.unet.parameters())
    ctx.log_metrics({"unet_parameters": float(n)})
    config = {k: v for k, v in parts.unet.config.items() if isinstance(v, (int, float, str, list))}
    info = BaseInfo(source="sd_pipeline", trained=False, image_size=None, channels=None, text_dim=None,
                    gate_passed=None, gate_per_class_accuracy=None, gate_min_accuracy=None, unet_parameters=n,
                    unet_config=config)
    io.write_json(ctx.out_dir / "base.json", info.model_dump())
