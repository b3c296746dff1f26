"""ASE: time-dependent early exiting in diffusion

Stages: prepare -> pretrain -> finetune -> evaluate, one module each (``tasks/early_exit_diffusion/<stage>.py``);
``data.py`` holds the prepared-data contract (read by every later stage), ``common.py`` the model helpers
shared by pretrain, finetune and evaluate. The method itself is ``models/early_exit_diffusion.py``.

CPU scale: scikit-learn digits upsampled to 16x16, a tiny class-conditional ``DiTTransformer2DModel``
trained from scratch, FD-proxy in a small digit classifier's feature space. Paper scale: DiT-XL/2 loaded
with ``from_pretrained`` from a local folder, SD-VAE latents of ImageNet prepared as a local file, the
paper's schedule; the same code path (tests run it on a tiny saved DiT).
"""
