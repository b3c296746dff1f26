"""The safety objectives ESD and SDD as the authors' code runs them, shared by both scales.

Each step draws x_t as the papers do: a DDIM index i ~ U{0..ddim_steps-1}, then i DDIM steps with
classifier-free guidance and the concept prompt from pure noise, sampled from the **student** (ESD: the UNet
with its safety adapter as it trains) or from the **EMA teacher** (SDD: the EMA of the adapter's weights).
Then, at the timestep t that x_t has reached:

* ESD (Gandikota et al. 2023): MSE(ε_S(x_t, c), ε0 − s (ε_c − ε0)), ε0 and ε_c from the frozen model (the
  same UNet with its adapters disabled);
* SDD (Kim et al. 2023): MSE(ε_S(x_t, c), sg[ε_S(x_t, "")]); the EMA of the adapter is the returned model.

An optional preservation term (not in either paper; weight 0 disables it) adds
w ||ε_S(x_t, b) − ε_T(x_t, b)||² for prompts b drawn from ``keep_emb``, at the same x_t.

The model is given by its UNet and prompt embeddings, so the CPU scale's tiny text encoder and the paper
scale's CLIP use the same loop. Pure torch / diffusers / peft.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from .adapters import SAFETY, activate, adapter_parameters, adapter_step, constant_decay_ema, esd_target, lora_config, \
    set_trainable


def eps(unet: UNet2DConditionModel, x: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=emb).sample


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Noise from a CPU generator (the same numbers on every device)."""
    return torch.randn(shape, generator=gen).to(device)


@torch.no_grad()
def ddim_cfg(unet: UNet2DConditionModel, sampler: DDIMScheduler, cond: torch.Tensor, uncond: torch.Tensor,
             steps: int, guidance: float, gen: torch.Generator, latent_shape: Sequence[int],
             stop_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DDIM (η = 0) with classifier-free guidance ε_u + g (ε_c − ε_u) from pure noise.

    ``stop_at`` = i returns the sample after i DDIM steps and the timestep it is at (ESD/SDD's partial
    sampling); otherwise the final sample and None. ``uncond`` is one null-prompt embedding (1, L, D).
    """
    if guidance < 1:
        raise ValueError(f"guidance scale must be >= 1, got {guidance}")
    sampler.set_timesteps(steps)
    n = cond.shape[0]
    x = randn((n, *latent_shape), gen, cond.device) * sampler.init_noise_sigma
    emb = torch.cat([uncond.expand(n, -1, -1), cond])
    for i, t in enumerate(sampler.timesteps):
        if stop_at is not None and i == stop_at:
            return x, t
        eu, ec = eps(unet, sampler.scale_model_input(torch.cat([x, x]), t), t, emb).chunk(2)
        x = sampler.step(eu + guidance * (ec - eu), t, x).prev_sample
    return x, None


@contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]):
    """Temporarily load the EMA weights into ``params`` (to sample from SDD's EMA teacher)."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def train_erasure(unet: UNet2DConditionModel, make_sampler: Callable[[], DDIMScheduler], c_emb: torch.Tensor,
                  null_emb: torch.Tensor, shape: Sequence[int], objective: str, steps: int, lr: float, rank: int,
                  layers: str, gen: torch.Generator, ddim_steps: int, guidance: float, esd_scale: float,
                  ema_decay: float, keep_emb: torch.Tensor | None = None, preserve_weight: float = 0.0,
                  on_step: Callable[[int, float], None] | None = None) -> None:
    """Add the adapter ``safety`` to the frozen ``unet`` and train it with ESD or SDD (in place).

    ``c_emb`` (B, L, D): the concept prompt's embedding repeated to the batch; ``null_emb`` (B, L, D): the
    null prompt's; ``shape``: one sample's shape; ``keep_emb`` (K, L, D): the preservation prompts.
    """
    if objective not in ("esd", "sdd"):
        raise ValueError(f"unknown safety objective {objective!r}; use 'esd' or 'sdd'")
    if ddim_steps < 1:
        raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
    device = c_emb.device
    unet.add_adapter(lora_config(rank, layers=layers), adapter_name=SAFETY)
    unet.to(device)
    activate(unet, {SAFETY: 1.0})
    params = set_trainable(unet, adapter_parameters(unet, SAFETY))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = constant_decay_ema(params, ema_decay) if objective == "sdd" else None
    batch = c_emb.shape[0]
    preserve = preserve_weight > 0 and keep_emb is not None and len(keep_emb) > 0
    for step in range(steps):
        i = int(torch.randint(0, ddim_steps, (1,), generator=gen))
        unet.eval()
        with ema_weights(ema, params) if ema is not None else _nothing():  # SDD: the EMA teacher samples
            xt, t = ddim_cfg(unet, make_sampler(), c_emb, null_emb[:1], ddim_steps, guidance, gen, shape, i)
        unet.train()
        with torch.no_grad():
            if objective == "esd":  # the frozen teacher: adapters off, ε0 and ε_c in one batched call
                unet.disable_adapters()
                e_null, e_c = eps(unet, torch.cat([xt, xt]), t, torch.cat([null_emb, c_emb])).chunk(2)
                unet.enable_adapters()
                target = esd_target(e_null, e_c, esd_scale)
            else:  # the student's own null-prompt prediction, stop-gradient
                target = eps(unet, xt, t, null_emb)
        loss = F.mse_loss(eps(unet, xt, t, c_emb), target)
        if preserve:
            k_emb = keep_emb[torch.randint(0, len(keep_emb), (batch,), generator=gen).to(keep_emb.device)]
            with torch.no_grad():
                unet.disable_adapters()
                keep_target = eps(unet, xt, t, k_emb)
                unet.enable_adapters()
            loss = loss + preserve_weight * F.mse_loss(eps(unet, xt, t, k_emb), keep_target)
        adapter_step(opt, params, loss, ema)
        if on_step:
            on_step(step, loss.item())
    if ema is not None:  # SDD returns the EMA teacher
        ema.copy_to(params)
    unet.requires_grad_(False)
    unet.eval()


@contextmanager
def _nothing():
    yield
