"""Benchmark: time per sampler step of L2E vs SGHMC on the held-out models, side by side.

    python benchmarks/l2e_sgmcmc.py [--steps 40] [--repeats 5] [--chains 3] [--device cpu] [--hidden 16]

Uses the meta-trained sampler of `dvc repro l2e_sgmcmc-metatrain` when artifacts/ holds it, else a
randomly initialised per-weight MLP of the params.yaml width (speed does not depend on its weights).
Held-out tasks, batch size, chains and dynamics come from params.yaml; the data are rebuilt from
scikit-learn (split 0). Timing is `models.l2e_sgmcmc.timing.time_per_step`, the code behind the evaluate
stage's `cost_per_step` claim: one process, samplers interleaved (order rotated per repeat), warm-up
excluded, same chains, minibatches and noise for both.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import numpy as np
    import torch
    import yaml

    from models.l2e_sgmcmc.sampler import Dynamics, LearnedKinetic, SGHMCKinetic, init_kinetic_net
    from models.l2e_sgmcmc.timing import time_per_step
    from tasks.l2e_sgmcmc.family import TaskArrays, dataset, split

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["l2e_sgmcmc"]
    prep, meta, samp = params["prepare"], params["metatrain"], params["sample"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=samp["timing_steps"], help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=samp["timing_repeats"])
    parser.add_argument("--chains", type=int, default=samp["chains"])
    parser.add_argument("--hidden", type=int, default=None, help="per-weight MLP width (random init)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trained = ROOT / "artifacts" / "l2e_sgmcmc" / "metatrain"
    if args.hidden is None and (trained / "kinetic.safetensors").is_file():
        from safetensors.torch import load_file

        info = yaml.safe_load((trained / "meta.json").read_text())
        phi, hidden, mult = load_file(str(trained / "kinetic.safetensors"))["trained"], info["hidden"], info["multiplier"]
        source = f"meta-trained (multiplier {mult:g})"
    else:
        hidden, mult = args.hidden or meta["hidden"], meta["multipliers"][-1]
        phi, source = init_kinetic_net(hidden, torch.Generator().manual_seed(0)), "random init"
    phi = phi.to(device)
    print(f"per-weight MLP 9-{hidden}-{hidden}-2 ({source}); device {device}; {args.chains} chains, batch "
          f"{samp['batch_size']}, {args.steps} steps x {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'task':<16} {'weights':>8} {'SGHMC ms/step':>14} {'L2E ms/step':>12} {'ratio':>7}")
    for task in prep["heldout"]:
        x, y = dataset(task["dataset"], np.random.default_rng(0), prep["data_dir"])
        arrays = split(x, y, prep["val_fraction"], prep["test_fraction"], prep["splits"][0])
        spec = TaskArrays(task["name"], tuple(task["hidden"]), task["activation"], arrays, task["arch"],
                          task["residual"]).spec()
        xt, yt = torch.as_tensor(arrays["x_train"]).to(device), torch.as_tensor(arrays["y_train"]).to(device)
        theta0 = spec.init(args.chains, torch.Generator().manual_seed(3), device)
        dyn = Dynamics(len(yt), samp["sghmc_step_mults"][0], meta["friction"], 1.0, meta["weight_decay"])
        kinetics = {"l2e": LearnedKinetic(phi, hidden, mult, mult, spec), "sghmc": SGHMCKinetic()}
        sec = time_per_step(spec, xt, yt, theta0, dyn, kinetics, args.steps, samp["batch_size"], args.repeats, 0)
        ratio = np.mean(np.array(sec["l2e"]) / np.array(sec["sghmc"]))
        print(f"{task['name']:<16} {spec.dim:>8} {1e3 * np.mean(sec['sghmc']):>14.3f} "
              f"{1e3 * np.mean(sec['l2e']):>12.3f} {ratio:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
