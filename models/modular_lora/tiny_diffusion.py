"""The CPU scale's text-to-image diffusion model and its three trainings (W0, the safety LoRA, the arms).

A conditional diffusers ``UNet2DConditionModel`` (DDPM loss, DDIM + CFG sampling) on 8×8 digits,
conditioned on a frozen tiny token-embedding text encoder (the stand-in for CLIP) and prompts
[style, digit]. The adapters and the arms' set-up are :mod:`models.modular_lora.adapters`'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from .adapters import adapter_step, arm_unet, constant_decay_ema, inference_view, report_step
from .erasure import ddim_cfg, train_erasure

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


def ddim_sampler() -> DDIMScheduler:
    """The pixel-space DDIM sampler (x0 predictions clipped to [-1, 1])."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


@torch.no_grad()
def sample(den: Denoiser, tokens: torch.Tensor, steps: int = 20, guidance: float = 3.0,
           gen: torch.Generator | None = None, batch: int = 1024, sample_size: int | None = None
           ) -> torch.Tensor:
    """DDIM sampling (η = 0) with classifier-free guidance ε_u + g (ε_c − ε_u) (:func:`.erasure.ddim_cfg`,
    the paper scale's sampler too). Returns images in [-1, 1]."""
    if guidance < 1:
        raise ValueError(f"guidance scale must be >= 1, got {guidance}")
    size = sample_size or den.unet.config.sample_size
    gen = gen if gen is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    uncond = den.text(null_tokens(1))
    outs = []
    for i in range(0, tokens.shape[0], batch):
        x, _ = ddim_cfg(den.unet, ddim_sampler(), den.text(tokens[i:i + batch]), uncond, steps, guidance, gen,
                        (1, size, size))
        outs.append(x.clamp(-1, 1))
    return torch.cat(outs)


def pretrain(den: Denoiser, images: torch.Tensor, tokens: torch.Tensor, steps: int, lr: float, batch: int,
             gen: torch.Generator, null_prob: float, ema_decay: float,
             on_step: Callable[[int, float], None] | None = None) -> UNet2DConditionModel:
    """Train W0 and the text encoder jointly on class-balanced batches; returns the UNet with its EMA weights."""
    sched = ddpm_scheduler()
    params = list(den.unet.parameters()) + list(den.text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ema = constant_decay_ema(den.unet.parameters(), ema_decay, include_initial=False)
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
        ema.step(den.unet.parameters())
        if on_step:
            on_step(step, loss.item())
    ema.copy_to(den.unet.parameters())
    for p in params:
        p.requires_grad_(False)
    return den.unet


def train_safety_lora(den: Denoiser, concept_tokens: torch.Tensor, keep_tokens: torch.Tensor, objective: str,
                      steps: int, lr: float, batch: int, rank: int, layers: str, gen: torch.Generator,
                      ddim_steps: int, guidance: float, esd_scale: float, preserve_weight: float, ema_decay: float,
                      on_step: Callable[[int, float], None] | None = None) -> None:
    """Add and train the adapter ``safety`` on the frozen UNet (in place) with ESD or SDD, as the paper scale
    does (:func:`.erasure.train_erasure`): x_t by i ~ U{0..ddim_steps-1} DDIM + CFG steps with the concept
    prompt ``concept_tokens`` (1, 2) from the student (ESD) or the EMA teacher (SDD). ``preserve_weight`` > 0
    adds ||ε_S(x_t, p) − ε_T(x_t, p)||² for prompts p of ``keep_tokens`` (K, 2) at the same x_t."""
    if len(concept_tokens) != 1:
        raise ValueError("the safety objective erases one concept prompt")
    size = den.unet.config.sample_size
    with torch.no_grad():
        c_emb = den.text(concept_tokens).expand(batch, -1, -1).contiguous()
        null_emb = den.text(null_tokens(batch))
        keep_emb = den.text(keep_tokens) if len(keep_tokens) else None
    train_erasure(den.unet, ddim_sampler, c_emb, null_emb, (1, size, size), objective, steps, lr, rank, layers,
                  gen, ddim_steps, guidance, esd_scale, ema_decay, keep_emb=keep_emb,
                  preserve_weight=preserve_weight, on_step=on_step)


def finetune_arm(arm: str, base: UNet2DConditionModel, text: TinyTextEncoder, images: torch.Tensor,
                 tokens: torch.Tensor, steps: int, lr: float, batch: int, rank: int, layers: str,
                 gen: torch.Generator, on_step: Callable[[int, float, UNet2DConditionModel], None] | None = None
                 ) -> UNet2DConditionModel:
    """Fine-tune on the benign set in one of the paper's arms (:func:`adapters.arm_unet`) and return the
    model used at inference. ``on_step(step, loss, inference_unet)`` sees the model as used at inference."""
    if len(images) == 0:
        raise ValueError("the fine-tuning set is empty")
    unet, params = arm_unet(arm, base, rank, layers)
    den = Denoiser(unet, text)
    sched = ddpm_scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        i = torch.randint(0, len(images), (batch,), generator=gen)
        loss = denoising_loss(den, sched, images[i], tokens[i], gen, null_prob=0.1)
        adapter_step(opt, params, loss)
        report_step(on_step, step, loss, arm, unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    return inference_view(arm, unet)
