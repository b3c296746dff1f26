"""Modular LoRA (Kim et al., arXiv 2412.00357): safety alignment backfires under benign fine-tuning.

The pieces, in the order the paper uses them:

* a conditional diffusion model W0 (diffusers ``UNet2DConditionModel``) on a frozen text encoder:
  the CPU scale's tiny digits model (:mod:`.tiny_diffusion`) or a Stable Diffusion pipeline's UNet in
  the VAE's latent space (:mod:`.stable_diffusion`);
* a **safety LoRA** ΔW_safe (peft ``LoraConfig`` through diffusers ``add_adapter``) trained with a
  concept-erasure objective, ESD (Gandikota et al. 2023) or SDD (Kim et al. 2023);
* benign fine-tuning in three arms (:func:`.adapters.arm_unet`): full fine-tuning of the merged safe
  model, a new LoRA on the merged safe model, and **Modular LoRA** (the fine-tuning LoRA trained on W0
  with the safety adapter off, both adapters active at inference: W* = W0 + ΔW_safe + ΔW_ft, an exact sum
  of LoRA outputs);
* model arithmetic: W0 − ΔW_safe and W0 + ΔW_safe − ΔW_ft (:mod:`.adapters`);
* the detectors that read the concept off samples (:mod:`.digits`, :mod:`.stable_diffusion`).

Pure torch / diffusers / peft / transformers: no file I/O, no tracking, no orchestration.
"""
