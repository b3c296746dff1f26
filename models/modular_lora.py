"""Modular LoRA (Kim et al., arXiv 2412.00357): safety alignment backfires under benign fine-tuning.

The pieces, in the order the paper uses them:

* a conditional diffusion model W0 (diffusers ``UNet2DConditionModel``, DDPM loss, DDIM + CFG sampling)
  conditioned on a frozen text encoder (here a tiny token-embedding encoder, the stand-in for CLIP);
* a **safety LoRA** ΔW_safe (peft ``LoraConfig`` through diffusers ``add_adapter``) trained with a
  concept-erasure objective, ESD (Gandikota et al. 2023) or SDD (Kim et al. 2023);
* benign fine-tuning in three arms: full fine-tuning of the merged safe model, a new LoRA on the merged
  safe model, and **Modular LoRA** (the fine-tuning LoRA trained on W0 with the safety adapter off,
  both adapters active at inference: W* = W0 + ΔW_safe + ΔW_ft, an exact sum of LoRA outputs);
* model arithmetic: W0 − ΔW_safe and W0 + ΔW_safe − ΔW_ft.

Pure torch / diffusers / peft: no file I/O, no tracking, no orchestration.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

SAFETY = "safety"
FINETUNE = "ft"

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the toy prompts: [style, digit]. NULL is the empty prompt used for classifier-free guidance.
# ----------------------------------------------------------------------------------------------------------
NULL, PLAIN, NEW = 0, 1, 2
DIGIT0 = 3  # token of digit d is DIGIT0 + d
VOCAB_SIZE = DIGIT0 + 10
STYLES = {"plain": PLAIN, "new": NEW}


def prompt_tokens(style: str, digits: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Token ids (B, 2) of the prompts [style, digit]."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {sorted(STYLES)}")
    d = torch.as_tensor(digits, dtype=torch.long).reshape(-1)
    if d.numel() and (d.min() < 0 or d.max() > 9):
        raise ValueError("digits must lie in 0..9")
    return torch.stack([torch.full_like(d, STYLES[style]), d + DIGIT0], dim=1)


def null_tokens(n: int) -> torch.Tensor:
    return torch.full((n, 2), NULL, dtype=torch.long)


class TinyTextEncoder(nn.Module):
    """Token + position embedding followed by a LayerNorm: the frozen 'CLIP' of the toy scale."""

    def __init__(self, dim: int = 32, vocab_size: int = VOCAB_SIZE, max_len: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok(tokens) + self.pos[: tokens.shape[1]])


def build_unet(sample_size: int = 8, channels: Sequence[int] = (32, 64), cross_dim: int = 32,
               head_dim: int = 8) -> UNet2DConditionModel:
    """A small diffusers conditional UNet (the toy W0's architecture)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=head_dim, norm_num_groups=8)


def ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters
# ----------------------------------------------------------------------------------------------------------
LORA_TARGETS = {
    # ESD-x analog: cross-attention only
    "xattn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    # all attention (self + cross)
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    # ESD-u analog: attention, resnet convs and the time embedding projection of each resnet
    "all": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "proj_in", "proj_out"],
}


def lora_config(rank: int, alpha: float | None = None, layers: str = "xattn") -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if layers not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA layer set {layers!r}; known: {sorted(LORA_TARGETS)}")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                      target_modules=LORA_TARGETS[layers])


def adapter_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of one adapter, found by name (set_adapters turns gradients on for every active one)."""
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"the UNet has no adapter named {name!r}")
    return params


def set_trainable(unet: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    params = list(params)
    ids = {id(p) for p in params}
    for p in unet.parameters():
        p.requires_grad_(id(p) in ids)
    return params


def merged_unet(unet: UNet2DConditionModel, weights: dict[str, float] | None = None) -> UNet2DConditionModel:
    """A plain UNet (no adapters) whose weights are W0 + Σ_k w_k ΔW_k, merged exactly in weight space."""
    weights = weights or {}
    src = copy.deepcopy(unet)
    for m in src.modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            with torch.no_grad():
                for name, w in weights.items():
                    if name in m.lora_A:
                        m.set_scale(name, 1.0)  # undo any set_adapters weight: ΔW at its trained scale
                        base.weight += w * m.get_delta_weight(name).to(base.weight.dtype)
    state = {}
    for k, v in src.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    out = UNet2DConditionModel.from_config(unet.config)
    out.load_state_dict(state)
    return out


def activate(unet: UNet2DConditionModel, weights: dict[str, float]) -> None:
    """Turn on exactly these adapters with these weights (an exact sum of LoRA outputs), or none.

    Which parameters are trainable is left as it was (peft's set_adapter would switch gradients on).
    """
    if not weights:
        unet.disable_adapters()
        return
    grad = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.enable_adapters()
    unet.set_adapters(list(weights), list(weights.values()))
    for n, p in unet.named_parameters():
        p.requires_grad_(grad[n])


# ----------------------------------------------------------------------------------------------------------
# Diffusion training and sampling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Denoiser:
    """The UNet plus its frozen text encoder: predicts ε(x_t, t, prompt)."""

    unet: UNet2DConditionModel
    text: TinyTextEncoder

    def __call__(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.text(tokens)).sample


def denoising_loss(den: Denoiser, sched: DDPMScheduler, x0: torch.Tensor, tokens: torch.Tensor,
                   gen: torch.Generator | None = None, null_prob: float = 0.0) -> torch.Tensor:
    """The DDPM ε-prediction loss (Ho et al. 2020, eq. 14), with prompt dropout to NULL for CFG."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
    if null_prob > 0:
        drop = torch.rand(b, generator=gen) < null_prob
        tokens = torch.where(drop[:, None], torch.full_like(tokens, NULL), tokens)
    xt = sched.add_noise(x0, noise, t)
    return F.mse_loss(den(xt, t, tokens), noise)


@torch.no_grad()
def sample(den: Denoiser, tokens: torch.Tensor, steps: int = 20, guidance: float = 3.0,
           gen: torch.Generator | None = None, batch: int = 1024, sample_size: int | None = None
           ) -> torch.Tensor:
    """DDIM sampling (η = 0) with classifier-free guidance ε_u + g (ε_c − ε_u). Returns images in [-1, 1]."""
    if guidance < 1:
        raise ValueError(f"guidance scale must be >= 1, got {guidance}")
    size = sample_size or den.unet.config.sample_size
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sched.set_timesteps(steps)
    outs = []
    for i in range(0, tokens.shape[0], batch):
        tok = tokens[i:i + batch]
        n = tok.shape[0]
        x = torch.randn((n, 1, size, size), generator=gen)
        cond = den.text(torch.cat([null_tokens(n), tok]))
        for t in sched.timesteps:
            e = den.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
            eu, ec = e.chunk(2)
            x = sched.step(eu + guidance * (ec - eu), t, x).prev_sample
        outs.append(x.clamp(-1, 1))
    return torch.cat(outs)


def pretrain(den: Denoiser, images: torch.Tensor, tokens: torch.Tensor, steps: int, lr: float, batch: int,
             gen: torch.Generator, null_prob: float = 0.1, ema_decay: float = 0.999,
             on_step: Callable[[int, float], None] | None = None) -> UNet2DConditionModel:
    """Train W0 and the text encoder jointly on class-balanced batches; returns the EMA copy of the UNet."""
    sched = ddpm_scheduler()
    params = list(den.unet.parameters()) + list(den.text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ema = torch.optim.swa_utils.AveragedModel(
        den.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
    labels = tokens[:, 1]
    by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    per = max(1, batch // len(by_class))
    for step in range(steps):
        idx = torch.cat([c[torch.randint(0, len(c), (per,), generator=gen)] for c in by_class])
        loss = denoising_loss(den, sched, images[idx], tokens[idx], gen, null_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.update_parameters(den.unet)
        if on_step:
            on_step(step, loss.item())
    for p in params:
        p.requires_grad_(False)
    return ema.module


# ----------------------------------------------------------------------------------------------------------
# Safety objectives (trained as a LoRA on the frozen W0)
# ----------------------------------------------------------------------------------------------------------
def esd_target(e_null: torch.Tensor, e_concept: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """ESD (Gandikota et al. 2023, eq. 3 with negative guidance): ε* = ε0 − s (ε_c − ε0), from the frozen model."""
    return e_null - scale * (e_concept - e_null)


def train_safety_lora(den: Denoiser, concept_images: torch.Tensor, concept_tokens: torch.Tensor,
                      keep_images: torch.Tensor, keep_tokens: torch.Tensor, objective: str, steps: int,
                      lr: float, batch: int, rank: int, layers: str, gen: torch.Generator,
                      esd_scale: float = 3.0, preserve_weight: float = 1.0, ema_decay: float = 0.999,
                      on_step: Callable[[int, float], None] | None = None) -> None:
    """Add and train the adapter ``safety`` on the frozen UNet (in place).

    x_t is a re-noised concept image at a random DDPM step (a cheap stand-in for ESD/SDD's partial
    sampling from the model). ESD regresses ε_S(x_t, c) on ε0 − s(ε_c − ε0) of the frozen teacher
    (adapters disabled); SDD regresses it on the student's own stop-gradient null prediction and keeps an
    EMA of the LoRA weights, which is the returned adapter. ``preserve_weight`` adds
    ||ε_S(x, p) − ε_T(x, p)||² on the other prompts (0 disables it).
    """
    if objective not in ("esd", "sdd"):
        raise ValueError(f"unknown safety objective {objective!r}; use 'esd' or 'sdd'")
    if len(concept_images) == 0:
        raise ValueError("no concept images for the safety objective")
    sched = ddpm_scheduler()
    unet = den.unet
    unet.add_adapter(lora_config(rank, layers=layers), adapter_name=SAFETY)
    activate(unet, {SAFETY: 1.0})
    params = set_trainable(unet, adapter_parameters(unet, SAFETY))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = [p.detach().clone() for p in params] if objective == "sdd" else None
    T = sched.config.num_train_timesteps
    for step in range(steps):
        i = torch.randint(0, len(concept_images), (batch,), generator=gen)
        x0, tok = concept_images[i], concept_tokens[i]
        t = torch.randint(0, T, (batch,), generator=gen)
        xt = sched.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        if objective == "esd":
            with torch.no_grad():  # the frozen teacher's ε0 and ε_c in one batched call
                unet.disable_adapters()
                both = den(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([null_tokens(batch), tok]))
                e_null, e_c = both.chunk(2)
                target = esd_target(e_null, e_c, esd_scale)
                unet.enable_adapters()
        else:
            with torch.no_grad():
                target = den(xt, t, null_tokens(batch))
        loss = F.mse_loss(den(xt, t, tok), target)
        if preserve_weight > 0 and len(keep_images):
            j = torch.randint(0, len(keep_images), (batch,), generator=gen)
            tj = torch.randint(0, T, (batch,), generator=gen)
            xj = sched.add_noise(keep_images[j], torch.randn(keep_images[j].shape, generator=gen), tj)
            with torch.no_grad():
                unet.disable_adapters()
                keep_target = den(xj, tj, keep_tokens[j])
                unet.enable_adapters()
            loss = loss + preserve_weight * F.mse_loss(den(xj, tj, keep_tokens[j]), keep_target)
        adapter_step(opt, params, loss, ema, ema_decay)
        if on_step:
            on_step(step, loss.item())
    if ema is not None:  # SDD returns the EMA teacher
        load_ema(ema, params)
    for p in unet.parameters():
        p.requires_grad_(False)


def adapter_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor,
                 ema: list[torch.Tensor] | None = None, ema_decay: float = 0.999) -> None:
    """One clipped optimiser step on the adapter parameters, then their EMA if one is kept (SDD)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - ema_decay)


@torch.no_grad()
def load_ema(ema: list[torch.Tensor], params: list[nn.Parameter]) -> None:
    """Copy the EMA weights into the adapter (SDD's returned teacher)."""
    for e, p in zip(ema, params):
        p.copy_(e)


# ----------------------------------------------------------------------------------------------------------
# Benign fine-tuning arms
# ----------------------------------------------------------------------------------------------------------
ARMS = ("full", "lora_on_safe", "modular")


def finetune_arm(arm: str, base: UNet2DConditionModel, text: TinyTextEncoder, images: torch.Tensor,
                 tokens: torch.Tensor, steps: int, lr: float, batch: int, rank: int, layers: str,
                 gen: torch.Generator, on_step: Callable[[int, float, UNet2DConditionModel], None] | None = None
                 ) -> UNet2DConditionModel:
    """Fine-tune on the benign set in one of the paper's arms and return the model used at inference.

    ``base`` carries the trained ``safety`` adapter on W0. Arms:
    full: all weights of the merged safe model W0 + ΔW_safe;
    lora_on_safe: a new ``ft`` LoRA on the merged safe model;
    modular: a new ``ft`` LoRA on W0 with the safety adapter disabled; at inference both adapters are on.
    ``on_step(step, loss, inference_unet)`` sees the model as it would be used at inference.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")
    if len(images) == 0:
        raise ValueError("the fine-tuning set is empty")
    if arm == "modular":
        unet = copy.deepcopy(base)
        unet.add_adapter(lora_config(rank, layers=layers), adapter_name=FINETUNE)
        activate(unet, {FINETUNE: 1.0})  # trains on W0: the safety adapter is off
        params = set_trainable(unet, adapter_parameters(unet, FINETUNE))
    else:
        unet = merged_unet(base, {SAFETY: 1.0})
        if arm == "full":
            params = set_trainable(unet, unet.parameters())
        else:
            unet.add_adapter(lora_config(rank, layers=layers), adapter_name=FINETUNE)
            params = set_trainable(unet, adapter_parameters(unet, FINETUNE))
    den = Denoiser(unet, text)
    sched = ddpm_scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def inference_view() -> UNet2DConditionModel:
        if arm == "modular":
            activate(unet, {SAFETY: 1.0, FINETUNE: 1.0})
        return unet

    def training_view() -> None:
        if arm == "modular":
            activate(unet, {FINETUNE: 1.0})

    for step in range(steps):
        i = torch.randint(0, len(images), (batch,), generator=gen)
        loss = denoising_loss(den, sched, images[i], tokens[i], gen, null_prob=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if on_step:
            unet.eval()
            on_step(step, loss.item(), inference_view())
            training_view()
            unet.train()
    for p in unet.parameters():
        p.requires_grad_(False)
    return inference_view()


# ----------------------------------------------------------------------------------------------------------
# Detector-based metrics
# ----------------------------------------------------------------------------------------------------------
def harmful_rate(predicted: np.ndarray | torch.Tensor, concept: int) -> float:
    """Share of samples the detector assigns to the concept class."""
    p = np.asarray(predicted)
    if p.size == 0:
        raise ValueError("no predictions")
    return float((p == concept).mean())


def class_histogram(predicted: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """Share of samples per predicted class (what a prompt generates)."""
    return np.bincount(np.asarray(predicted, dtype=int), minlength=n_classes)[:n_classes] / max(1, len(predicted))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula, Heusel et al. 2017)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ----------------------------------------------------------------------------------------------------------
# The toy data's styles and the digit detector
# ----------------------------------------------------------------------------------------------------------
NEW_STYLES = ("invert", "thick", "flip")


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """The benign fine-tuning domain's look, applied to images in [-1, 1] of shape (N, 1, H, W)."""
    if style == "invert":
        return -images
    if style == "thick":  # strokes dilated by a 2x2 max filter
        return F.max_pool2d(F.pad(images, (0, 1, 0, 1), value=-1.0), 2, stride=1)
    if style == "flip":
        return images.flip(-1)
    raise ValueError(f"unknown new style {style!r}; known: {NEW_STYLES}")


class DigitDetector(nn.Module):
    """A small MLP digit classifier; its hidden layer is the feature space of the FD-proxy."""

    def __init__(self, pixels: int = 64, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self(x).argmax(1).numpy()


def train_detector(images: torch.Tensor, labels: torch.Tensor, steps: int, gen: torch.Generator,
                   noise: float = 0.3, lr: float = 3e-3, batch: int = 256) -> DigitDetector:
    """Train on real images with Gaussian-noise and blur augmentation so it tolerates imperfect samples."""
    det = DigitDetector(pixels=images[0].numel())
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[i]
        if noise > 0:
            x = (x + noise * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen))
            blur = torch.rand(batch, generator=gen) < 0.3
            x = torch.where(blur[:, None, None, None], F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                                                                    3, stride=1), x)
        loss = F.cross_entropy(det(x.clamp(-1, 1)), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    det.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    return det
