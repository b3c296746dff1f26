"""The paper-scale code path (DiT from a local `from_pretrained` folder, latent data, learned sigma,
guidance), run on a tiny randomly initialised DiT saved with `save_pretrained`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PAPER = "early_exit_diffusion"


@pytest.mark.slow
def test_paper_path_finetunes_and_samples_a_saved_dit(tmp_path):
    from diffusers import DiTTransformer2DModel

    from tasks.core import run_stage

    # a DiT-XL/2-shaped model in miniature: 4 latent channels, learned sigma, DiTPipeline folder layout
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=5)
    dit.save_pretrained(tmp_path / "DiT" / "transformer")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 12)
    x = (rng.normal(size=(len(y), 4, 8, 8)) * 0.5 + y[:, None, None, None] * 0.2).astype(np.float32)
    np.savez(tmp_path / "latents.npz", x=x, y=y)

    params = {
        "seed": 0, "device": "cpu",
        PAPER: {
            "prepare": {"source": "latents", "latents_path": str(tmp_path / "latents.npz"), "image_size": 16,
                        "test_fraction": 0.25, "max_images": None, "classifier_epochs": 1},
            "pretrain": {"init": "pretrained", "model_dir": str(tmp_path / "DiT"), "subfolder": "transformer",
                         "num_layers": 6, "hidden": 64, "heads": 4, "patch_size": 4,
                         "steps": 0, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 0,
                         "lr_schedule": "constant", "grad_clip": 1.0, "ema_decay": 0.999, "label_dropout": 0.1,
                         "seeds": [0], "workers": 1},
            "finetune": {"schedule": [4, 4, 3, 3, 2, 2, 1, 1, 1, 1], "variants": ["ase", "reversed", "uniform"],
                         "steps": 2, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 0,
                         "lr_schedule": "cosine", "grad_clip": 1.0,
                         "ema_decay": 0.9999, "label_dropout": 0.1, "freeze_time_embedder": True, "seeds": [0],
                         "workers": 1},
            "evaluate": {"samplers": {"ddpm": 3, "ddim": 3, "dpm_solver": 3}, "num_images": 10, "batch_size": 5,
                         "guidance_scale": 1.5, "timing_passes": 2, "speedup_threshold": 1.25, "quality_tolerance": 1.1,
                         "finetuning_fd_ratio": 1.0, "direction_fd_ratio": 1.0, "fewer_steps_fd_ratio": 1.0,
                         "base_label_accuracy_min": 0.85,
                         "base_fd_ratio_max": 3.0, "grid_sampler": "ddim", "workers": 1},
        },
    }
    (tmp_path / "repo").mkdir()
    root = tmp_path / "repo"
    for name in ("prepare", "pretrain", "finetune", "evaluate"):
        run_stage(PAPER, name, root=root, params=params, track=False)

    from tasks.early_exit_diffusion.common import base_dir

    pre = root / "artifacts" / PAPER / "pretrain"
    assert base_dir(pre, 0) == base_dir(pre, 7) == pre / "model"  # the loaded DiT serves every seed
    loaded = DiTTransformer2DModel.from_pretrained(pre / "model")
    for a, b in zip(loaded.parameters(), dit.parameters()):  # the pretrained weights came through unchanged
        assert torch.equal(a, b)
    tuned = DiTTransformer2DModel.from_pretrained(root / "artifacts" / PAPER / "finetune" / "ase_seed0")
    blk = 0
    assert torch.equal(tuned.transformer_blocks[blk].norm1.emb.timestep_embedder.linear_1.weight,
                       dit.transformer_blocks[blk].norm1.emb.timestep_embedder.linear_1.weight)  # frozen
    assert not torch.equal(tuned.proj_out_2.weight, dit.proj_out_2.weight)  # the rest was trained

    from tasks.core.claims import rederive

    metrics = json.loads((root / "results" / PAPER / "metrics.json").read_text())
    assert all(rederive(metrics["claims_detail"][k]) == v for k, v in metrics["claims"].items())
    m = json.loads((root / "results" / PAPER / "evidence.json").read_text())
    assert m["num_layers"] == 4
    for sampler, variants in m["summary"].items():
        for v in variants.values():
            assert np.isfinite(v["fd_proxy"])
        # guidance doubles the batch: 2 x blocks per step
        assert variants["full"]["blocks_per_image"] == 2 * 4 * 3
        assert variants["ase"]["blocks_per_image"] < variants["full"]["blocks_per_image"]
        # the equal-compute baseline counts guidance too: within half a (guided) step of ASE's blocks
        assert abs(variants["full_fewer_steps"]["blocks_per_image"] - variants["ase"]["blocks_per_image"]) <= 4


def test_missing_pretrained_folder_is_a_clear_error(tmp_path):
    from tasks.core import run_stage
    from tasks.core.errors import MissingInputError

    np.savez(tmp_path / "latents.npz", x=np.zeros((20, 4, 8, 8), np.float32), y=np.arange(20) % 2)
    params = {"seed": 0, "device": "cpu", PAPER: {
        "prepare": {"source": "latents", "latents_path": str(tmp_path / "nope.npz"), "image_size": 16,
                    "test_fraction": 0.25, "max_images": None, "classifier_epochs": 1}}}
    with pytest.raises(MissingInputError, match="latents_path"):
        run_stage(PAPER, "prepare", root=tmp_path, params=params, track=False)
