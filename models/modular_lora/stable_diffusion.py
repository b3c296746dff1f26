"""Modular LoRA at paper scale: the same method on a Stable Diffusion pipeline's UNet, in latent space.

W0 is the pipeline's ``UNet2DConditionModel``, conditioned on its frozen CLIP text encoder; images live in
the VAE's latent space. The adapters, the arms' set-up, the merges, the model arithmetic and the ESD/SDD
loop (:mod:`.erasure`: x_t by partial DDIM + CFG sampling from the student or the EMA teacher) are the CPU
scale's; what changes here:

* the prompts are embedded by CLIP, the samples are VAE latents (DDIM without clipping);
* the noise schedule is the pipeline's own (``DDPMScheduler``/``DDIMScheduler.from_config``);
* the benign fine-tuning is the text-to-image denoising loss on VAE latents of an image-caption folder.

Pure torch / diffusers / peft / transformers objects: no file I/O, no tracking, no orchestration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from .adapters import adapter_step, arm_unet, inference_view, report_step
from .erasure import ddim_cfg, eps, randn as _randn, train_erasure


# ----------------------------------------------------------------------------------------------------------
# The pipeline's parts
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SDParts:
    """UNet (W0, carries the adapters), frozen VAE, frozen CLIP text encoder + tokenizer, scheduler config."""

    unet: UNet2DConditionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    latent_size: int  # image resolution / the VAE's downsampling factor

    def freeze(self) -> "SDParts":
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        return self

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def sampler(self) -> DDIMScheduler:
        # latents are not confined to [-1, 1]: never clip the predicted x0 (DDIM's default for pixel models)
        return DDIMScheduler.from_config(self.scheduler_config, clip_sample=False)

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (last hidden state), padded to the tokenizer's max length as SD does."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> scaled VAE latents (the posterior mean)."""
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(self.device, self.vae.dtype)
            out.append(self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor)
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (N, 3, H, W) on the CPU."""
        out = []
        for i in range(0, len(latents), batch):
            z = latents[i:i + batch].to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
            out.append((self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)


def generate(parts: SDParts, prompts: Sequence[str], n_per_prompt: int, steps: int, guidance: float,
             seed: int, batch: int = 8) -> torch.Tensor:
    """Images in [0, 1] of every prompt, ``n_per_prompt`` each, prompt-major order, with the UNet as it is."""
    gen = torch.Generator().manual_seed(int(seed))
    uncond = parts.embed([""])
    todo = [p for p in prompts for _ in range(n_per_prompt)]
    shape = (parts.unet.config.in_channels, parts.latent_size, parts.latent_size)
    out = []
    for i in range(0, len(todo), batch):
        z, _ = ddim_cfg(parts.unet, parts.sampler(), parts.embed(todo[i:i + batch]), uncond, steps, guidance,
                        gen, shape)
        out.append(parts.decode(z))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Safety LoRA with ESD / SDD on the pipeline's UNet (the loop is :func:`.erasure.train_erasure`, both scales')
# ----------------------------------------------------------------------------------------------------------
def train_safety_lora(parts: SDParts, concept: str, objective: str, steps: int, lr: float, rank: int,
                      layers: str, gen: torch.Generator, ddim_steps: int, guidance: float,
                      esd_scale: float, ema_decay: float, batch: int, keep_prompts: Sequence[str] = (),
                      preserve_weight: float = 0.0, on_step: Callable[[int, float], None] | None = None) -> None:
    """Add and train the adapter ``safety`` on the frozen pipeline UNet (in place): ESD or SDD with x_t drawn
    by partial DDIM + CFG sampling with the concept prompt from the student (ESD) or the EMA teacher (SDD).
    ``preserve_weight`` > 0 adds ||ε_S(x_t, b) − ε_T(x_t, b)||² for prompts b of ``keep_prompts``."""
    if not concept:
        raise ValueError("the safety objective needs a concept prompt")
    c_emb, null_emb = parts.embed([concept] * batch), parts.embed([""] * batch)
    keep_emb = parts.embed(list(keep_prompts)) if keep_prompts and preserve_weight > 0 else None
    shape = (parts.unet.config.in_channels, parts.latent_size, parts.latent_size)
    train_erasure(parts.unet, parts.sampler, c_emb, null_emb, shape, objective, steps, lr, rank, layers, gen,
                  ddim_steps, guidance, esd_scale, ema_decay, keep_emb=keep_emb, preserve_weight=preserve_weight,
                  on_step=on_step)


# ----------------------------------------------------------------------------------------------------------
# Benign fine-tuning arms on VAE latents of an image-caption set
# ----------------------------------------------------------------------------------------------------------
def finetune_arm(arm: str, parts: SDParts, latents: torch.Tensor, captions: Sequence[str], steps: int,
                    lr: float, batch: int, rank: int, layers: str, gen: torch.Generator, null_prob: float = 0.1,
                    on_step: Callable[[int, float, UNet2DConditionModel], None] | None = None
                    ) -> UNet2DConditionModel:
    """Text-to-image fine-tuning (DDPM ε loss on VAE latents, the pipeline's noise schedule) in one arm.

    ``parts.unet`` carries the trained ``safety`` adapter on W0; it is not modified. Captions are dropped
    to "" with probability ``null_prob`` so classifier-free guidance keeps working.
    """
    if len(latents) == 0 or len(latents) != len(captions):
        raise ValueError("the fine-tuning set is empty or its captions do not match its latents")
    unet, params = arm_unet(arm, parts.unet, rank, layers)
    sched = parts.noise_scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    T = sched.config.num_train_timesteps
    for step in range(steps):
        i = torch.randint(0, len(latents), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < null_prob
        emb = parts.embed(["" if d else captions[j] for j, d in zip(i.tolist(), drop.tolist())])
        x0 = latents[i].to(parts.device)
        noise = _randn(x0.shape, gen, parts.device)
        t = torch.randint(0, T, (batch,), generator=gen).to(parts.device)
        unet.train()
        loss = F.mse_loss(eps(unet, sched.add_noise(x0, noise, t), t, emb), noise)
        adapter_step(opt, params, loss)
        report_step(on_step, step, loss, arm, unet)
    unet.requires_grad_(False)
    unet.eval()
    return inference_view(arm, unet)


# ----------------------------------------------------------------------------------------------------------
# Detectors (pluggable) and image features
# ----------------------------------------------------------------------------------------------------------
class ImageClassifierDetector:
    """A transformers image classifier as the harm detector: P(concept label) and pooled features.

    Images come in [0, 1] (N, 3, H, W); they are resized to the classifier's input size and normalised
    with its processor's mean/std. ``concept_index`` is the label that means "the concept".
    """

    def __init__(self, model, concept_index: int, size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], device: torch.device, threshold: float = 0.5, batch: int = 32):
        n_labels = model.config.num_labels
        if not 0 <= concept_index < n_labels:
            raise ValueError(f"concept label index {concept_index} is outside the classifier's {n_labels} labels")
        self.model = model.to(device).eval()
        self.concept_index, self.size, self.device = concept_index, tuple(size), device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.threshold, self.batch = threshold, batch

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def concept_prob(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            logits = self.model(pixel_values=self._inputs(images[i:i + self.batch])).logits.float()
            out.append(logits.softmax(-1)[:, self.concept_index].cpu())
        return torch.cat(out).numpy()

    def is_concept(self, images: torch.Tensor) -> np.ndarray:
        return self.concept_prob(images) > self.threshold

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """The classifier's last hidden state, mean-pooled over positions (the FD feature space)."""
        out = []
        for i in range(0, len(images), self.batch):
            h = self.model(pixel_values=self._inputs(images[i:i + self.batch]), output_hidden_states=True
                           ).hidden_states[-1].float()
            out.append((h.mean(dim=(2, 3)) if h.dim() == 4 else h.mean(dim=1)).cpu())
        return torch.cat(out).numpy()


def concept_flags(detector, images: torch.Tensor) -> np.ndarray:
    """1.0 for each image the detector flags as the concept, else 0.0 (the per-sample harmful outcome)."""
    flags = np.asarray(detector.is_concept(images), dtype=np.float64).reshape(-1)
    if flags.size == 0:
        raise ValueError("no images to rate")
    return flags


def concept_rate(detector, images: torch.Tensor) -> float:
    """Share of the images the detector flags as the concept (the harmful rate)."""
    return float(concept_flags(detector, images).mean())
