"""Benchmark: sampling speed of the full DiT vs ASE early exiting, per sampler, side by side.

    python benchmarks/early_exit_diffusion.py [--repeats 3] [--timing-passes 3] [--num-images 250] [--batch-size 250]

Uses the trained models of `dvc repro early_exit_diffusion-evaluate` when artifacts/ holds them (the
pretrained full model, the ASE fine-tune of the first seed), else a randomly initialised DiT of the
params.yaml size (speed does not depend on the weights).  Samplers, steps, batch size and schedule come
from params.yaml.  Timing is `models.early_exit_diffusion.sampling_grid`, the code the evaluate stage's
`ase_faster` claim uses: one process, variants interleaved (order rotated per repeat), warm-up excluded,
same batch size and same noise for both variants, each solver step timed over `--timing-passes` lockstep
passes (the minimum; default: params.yaml's evaluate.timing_passes).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import numpy as np
    import torch
    import yaml

    from models.early_exit_diffusion import EarlyExitDenoiser, sampling_grid, schedule_for, tiny_dit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant and sampler")
    parser.add_argument("--timing-passes", type=int, default=None,
                        help="lockstep passes per batch, per step the minimum (default: params.yaml)")
    parser.add_argument("--num-images", type=int, default=None, help="images per run (default: params.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml evaluate.batch_size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--random-init", action="store_true", help="ignore trained artifacts")
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["early_exit_diffusion"]
    ev, pre, ft = params["evaluate"], params["pretrain"], params["finetune"]
    n = args.num_images or ev["num_images"]
    bs = args.batch_size or ev["batch_size"]
    art = ROOT / "artifacts" / "early_exit_diffusion"
    if not args.random_init and (art / "pretrain" / "meta.json").is_file() and (art / "finetune" / "ase_seed0").is_dir():
        from diffusers import DiTTransformer2DModel

        from tasks.early_exit_diffusion.common import base_dir

        full_model = DiTTransformer2DModel.from_pretrained(str(base_dir(art / "pretrain", 0))).eval()
        ase_model = DiTTransformer2DModel.from_pretrained(str(art / "finetune" / "ase_seed0")).eval()
        source = "trained artifacts"
    else:
        torch.manual_seed(0)
        full_model = tiny_dit(pre["num_layers"], pre["hidden"], pre["heads"], params["prepare"]["image_size"],
                              pre["patch_size"]).eval()
        ase_model = full_model
        source = "random init"
    c, s = full_model.config.in_channels, full_model.config.sample_size
    dens = {"full": EarlyExitDenoiser(full_model, schedule_for(full_model, None)),
            "ase": EarlyExitDenoiser(ase_model, schedule_for(ase_model, ft["schedule"]))}
    labels = torch.arange(n) % 10
    passes = args.timing_passes or ev["timing_passes"]
    print(f"models: {source}; {len(full_model.transformer_blocks)} blocks; ASE schedule {ft['schedule']} "
          f"({dens['ase'].schedule.compute_fraction:.0%} of block compute); {n} images/run, batch {bs}, "
          f"{args.repeats} repeats of {passes} timing passes, torch threads {torch.get_num_threads()}")
    grid = sampling_grid(dens, dict(ev["samplers"]), labels, (c, s, s), list(range(args.repeats)), bs,
                         timing_passes=passes)
    print(f"{'sampler':<11} {'steps':>5} {'full img/s':>11} {'ASE img/s':>10} {'speed-up':>9} "
          f"{'full blocks/img':>16} {'ASE blocks/img':>15} {'block ratio':>12}")
    for sampler, steps in ev["samplers"].items():
        full = [grid[(r, sampler, "full")] for r in range(args.repeats)]
        ase = [grid[(r, sampler, "ase")] for r in range(args.repeats)]
        ratio = np.mean([a["images_per_s"] / f["images_per_s"] for a, f in zip(ase, full)])
        fb, ab = full[0]["blocks_per_image"], ase[0]["blocks_per_image"]
        print(f"{sampler:<11} {steps:>5} {np.mean([f['images_per_s'] for f in full]):>11.1f} "
              f"{np.mean([a['images_per_s'] for a in ase]):>10.1f} {ratio:>8.2f}x {fb:>16.0f} {ab:>15.0f} "
              f"{fb / ab:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
