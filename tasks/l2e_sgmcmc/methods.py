"""The samplers compared on one held-out task and data split, at equal gradient evaluations and equal
sample count: trained and untrained L2E, SGHMC (constant step), cyclical SGHMC and a deep ensemble.
Every baseline's settings are tuned on the validation split (one chain per setting, the whole grid as one
batch of chains); the chosen settings then run ``chains`` chains from initialisations shared by all
methods, scored on the test split."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from tasks.metrics import ece, error, nll

from .family import load_task

METHODS = ("l2e", "l2e_untrained", "sghmc", "csghmc", "ensemble")


@dataclass(frozen=True)
class TaskJob:
    params: dict           # the sample stage's params
    entry: dict            # the task's entry of prepare's meta.json
    data_dir: str
    kinetic_file: str
    kinetic: dict          # metatrain's meta.json
    seed: int
    device: str


class Bench:
    """A task's tensors and the runners of every method on them."""

    def __init__(self, job: TaskJob):
        import torch

        from tasks.core import io

        self.p, self.k = job.params, job.kinetic
        task = load_task(Path(job.data_dir) / "heldout", job.entry)
        self.device = torch.device(job.device)
        t = lambda key: torch.as_tensor(task.arrays[key]).to(self.device)
        self.x, self.y = t("x_train"), t("y_train")
        self.x_val, self.y_val, self.x_test, self.y_test = t("x_val"), t("y_val"), t("x_test"), t("y_test")
        self.spec = task.spec()
        self.phi = {k: v.to(self.device) for k, v in io.load_state(job.kinetic_file).items()}
        self.seed = job.seed

    def generator(self, offset: int):
        import torch

        return torch.Generator(device=self.device).manual_seed(self.seed * 1000 + offset)

    def dynamics(self, method: str, step_mult, temperature):
        """L2E keeps the paper's C = 0.1. SGHMC and cSGHMC use Chen et al.'s parameterisation: learning
        rate eta = eps^2 N = step_mult on the mean loss and momentum decay eps C = sghmc_momentum_decay per
        step (C = 0.1 there leaves almost no friction and the chains diverge)."""
        from models.l2e_sgmcmc.sampler import Dynamics

        dyn = Dynamics(self.x.shape[0], step_mult, self.k["friction"], temperature, self.k["weight_decay"])
        if method.startswith("l2e"):
            return dyn
        return Dynamics(dyn.n_data, step_mult, self.p["sghmc_momentum_decay"] / dyn.eps, temperature,
                        dyn.weight_decay)

    def kinetic(self, name: str):
        from models.l2e_sgmcmc.sampler import LearnedKinetic, SGHMCKinetic

        if name == "sghmc":
            return SGHMCKinetic()
        phi = self.phi["trained" if name == "l2e" else "untrained"]
        return LearnedKinetic(phi, self.k["hidden"], self.k["multiplier"], self.k["multiplier"], self.spec)

    def column(self, values, rows_each: int):
        import torch

        return torch.tensor(values, dtype=torch.float32, device=self.device).repeat_interleave(rows_each)[:, None]

    def run(self, method: str, config: dict, theta0, offset: int):
        """Samples [K, B, D] of ``method`` with ``config`` (values scalar, or lists: one per row block)."""
        from models.l2e_sgmcmc import sampler as S

        p, rows = self.p, theta0.shape[0]
        gen = self.generator(offset)
        if method == "ensemble":
            members = p["samples"]
            theta = S.deep_ensemble(self.spec, self.x, self.y, theta0, p["steps"] // members, p["batch_size"],
                                    config["lr"], self.k["weight_decay"], gen)
            return theta.reshape(rows // members, members, -1).transpose(0, 1)
        block = rows // len(config["step_mult"])
        dyn = self.dynamics(method, self.column(config["step_mult"], block),
                            self.column(config["temperature"], block))
        if method == "csghmc":
            schedule = S.cyclical_schedule(p["steps"], config["cycles"], p["explore_fraction"])
            steps = S.cyclical_sample_steps(p["steps"], config["cycles"], p["samples"], p["explore_fraction"])
        else:
            schedule, steps = S.constant_schedule, S.thinned_steps(p["steps"], p["burn_in"], p["samples"])
        kinetic = self.kinetic(method if method != "csghmc" else "sghmc")
        return S.run_chains(self.spec, self.x, self.y, theta0, kinetic, dyn, p["steps"], p["batch_size"], steps,
                            gen, schedule)

    def grid(self, method: str) -> list[dict]:
        p = self.p
        if method == "ensemble":
            return [{"lr": lr} for lr in p["ensemble_lrs"]]
        if method == "csghmc":
            return [{"cycles": c, "step_mult": [s], "temperature": [t]}
                    for c, s, t in itertools.product(p["csghmc_cycles"], p["csghmc_step_mults"],
                                                     p["csghmc_temperatures"])]
        mults = p["l2e_step_mults"] if method.startswith("l2e") else p["sghmc_step_mults"]
        temp = self.k["temperature"] if method.startswith("l2e") else 1.0
        return [{"step_mult": [s], "temperature": [temp]} for s in mults]

    def tune(self, method: str) -> tuple[dict, list[dict]]:
        """The grid setting with the lowest validation BMA NLL (one chain each; settings that differ only
        in step size and temperature share one batched run)."""
        import torch

        grid, scores = self.grid(method), []
        batches = itertools.groupby(grid, key=lambda c: c.get("cycles", c.get("lr")))
        for i, (_, group) in enumerate(batches):
            group = list(group)
            if method == "ensemble":
                theta0 = self.spec.init(self.p["samples"], self.generator(500 + i), self.device)
                samples = self.run(method, group[0], theta0, 600 + i)
            else:
                merged = {**group[0], "step_mult": [c["step_mult"][0] for c in group],
                          "temperature": [c["temperature"][0] for c in group]}
                theta0 = self.spec.init(1, self.generator(500 + i), self.device).repeat(len(group), 1)
                samples = self.run(method, merged, theta0, 600 + i)
            probs = self.probs(samples, self.x_val)
            scores += [nll(probs[:, r].mean(0), self.y_val.cpu().numpy()) for r in range(probs.shape[1])]
        scores = [s if math.isfinite(s) else float("inf") for s in scores]
        best = int(np.argmin(scores))
        return grid[best], [{**c, "val_nll": s} for c, s in zip(grid, scores)]

    def probs(self, samples, x) -> np.ndarray:
        """Predictions [K, B, n, C] of samples [K, B, D]."""
        from models.l2e_sgmcmc.network import probabilities

        k, b, d = samples.shape
        out = probabilities(self.spec, samples.reshape(k * b, d), x).reshape(k, b, x.shape[0], -1)
        return np.nan_to_num(out.cpu().numpy(), nan=1.0 / out.shape[-1])

    def val_loss(self, rows):
        from models.l2e_sgmcmc.network import nll_per_row

        import torch

        with torch.no_grad():
            return torch.cat([nll_per_row(self.spec, rows[i:i + 256], self.x_val, self.y_val)
                              for i in range(0, rows.shape[0], 256)])


def score_chains(bench: Bench, samples) -> dict:
    """Per chain: BMA accuracy, NLL and ECE on the test split, the mean single-sample NLL, the pairwise
    disagreement, BMA NLL after the first k samples, the mode count by loss barriers on the validation
    split; across chains: R-hat and ESS of the samples' test NLL and of the weights."""
    from models.l2e_sgmcmc.diagnostics import disagreement, ess, mode_count, path_losses, rhat

    p = bench.p
    y = bench.y_test.cpu().numpy()
    probs = bench.probs(samples, bench.x_test)
    chains = []
    for c in range(probs.shape[1]):
        pc = probs[:, c]
        modes, bars = mode_count(samples[:, c], bench.val_loss, p["barrier_points"], p["barrier_delta"])
        upper = bars[np.triu_indices(len(bars), 1)]
        chains.append({"acc": 1 - error(pc.mean(0), y), "nll": nll(pc.mean(0), y), "ece": ece(pc.mean(0), y),
                       "single_nll": float(np.mean([nll(q, y) for q in pc])),
                       "disagreement": disagreement(pc), "modes": modes,
                       "mean_barrier": float(upper.mean()), "max_barrier": float(upper.max()),
                       "nll_vs_samples": [nll(pc[:k + 1].mean(0), y) for k in range(len(pc))]})
    single = np.array([[nll(probs[k, c], y) for k in range(probs.shape[0])] for c in range(probs.shape[1])])
    weights = samples[:, :, :p["mixing_weights"]].transpose(0, 1).cpu().numpy()  # [chains, K, w]
    w_rhat, w_ess = rhat(weights), ess(weights)
    _, path = path_losses(samples[:4, 0], bench.val_loss, p["barrier_points"])
    return {"chains": chains,
            "mixing": {"rhat_test_nll": float(rhat(single)), "ess_test_nll": float(ess(single)),
                       "weights_rhat_below_1_2": float(np.mean(w_rhat < 1.2)),
                       "weights_ess_median": float(np.median(w_ess))},
            "path_losses": path.cpu().numpy().tolist()}


def run_task(job: TaskJob) -> dict:
    """Tune every method on validation, run it on ``chains`` chains, score it on test."""
    bench = Bench(job)
    p = job.params
    tuned, grids, methods = {}, {}, {}
    for m in METHODS:
        tuned[m], grids[m] = bench.tune(m)
    theta0 = bench.spec.init(p["chains"], bench.generator(1), bench.device)
    members0 = bench.spec.init(p["chains"] * p["samples"], bench.generator(2), bench.device)
    for i, m in enumerate(METHODS):
        samples = bench.run(m, tuned[m], members0 if m == "ensemble" else theta0, 700 + i)
        methods[m] = score_chains(bench, samples)
    e = job.entry
    return {"task": e["task"], "split": e["split"], "name": e["name"], "n_train": e["n_train"],
            "n_test": e["n_test"], "unseen_architecture": e["unseen_architecture"], "weights": bench.spec.dim,
            "tuned": tuned, "grids": grids, "methods": methods}


def timing_rows(job: TaskJob) -> dict:
    """Seconds per step of trained L2E and SGHMC on the task's model (chains as in sampling)."""
    from models.l2e_sgmcmc.timing import time_per_step

    bench = Bench(job)
    p = job.params
    theta0 = bench.spec.init(p["chains"], bench.generator(3), bench.device)
    dyn = bench.dynamics("sghmc", p["sghmc_step_mults"][0], 1.0)
    seconds = time_per_step(bench.spec, bench.x, bench.y, theta0, dyn,
                            {"l2e": bench.kinetic("l2e"), "sghmc": bench.kinetic("sghmc")},
                            p["timing_steps"], p["batch_size"], p["timing_repeats"], job.seed)
    return {**seconds, "weights": bench.spec.dim}
