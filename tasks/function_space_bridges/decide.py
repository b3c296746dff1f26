"""Claims and headline of the function_space_bridges evaluation, from the per-seed rows."""
from __future__ import annotations

import numpy as np

from tasks.core.claims import all_of, gate, per_seed


def resolution_excess(base: float, other: float, relative: float, absolute: float) -> float:
    """|change| over the larger tolerance (relative x |base| or absolute): below 1 when either holds."""
    return abs(other - base) / max(relative * abs(base), absolute)


def decide(rows: list[dict], m):
    fn = [r["functions"] for r in rows]
    im = [r["images"] for r in rows]
    grids = fn[0]["grids"]
    lo, hi = [k for k in im[0] if k != "examples"][:2]
    g0 = str(grids[0])
    gates = [gate("classifier_accepts_real_b", np.mean([i[lo]["floor"]["domain_accuracy"] for i in im]), 0.9, ">=",
                  "real domain-B test images classified into domain B"),
             gate("classifier_rejects_real_a", np.mean([1 - i[lo]["no_transport"]["domain_accuracy"] for i in im]),
                  0.9, ">=", "real domain-A test images not classified into domain B"),
             gate("mmd_floor_below_no_transport", np.mean([f[g0]["floor"] / f[g0]["no_transport"] for f in fn]),
                  0.05, "<=", "MMD^2 of held-out pi_1 vs pi_1 over MMD^2 of no transport")]
    image_gates, function_gates = gates[:2], gates[2:]
    claims = [
        all_of("bridge_transports", {
            "images_fd_ratio": per_seed("images_fd_ratio",
                                        [i[lo]["final"]["fd"] / i[lo]["no_transport"]["fd"] for i in im],
                                        margin=m.transport_fd_ratio, direction="<", gates=image_gates,
                                        statement="FD-proxy of transported A->B over no transport (training grid)"),
            "images_domain_accuracy": per_seed("images_domain_accuracy",
                                               [i[lo]["final"]["domain_accuracy"] for i in im],
                                               margin=m.domain_accuracy, gates=image_gates,
                                               statement="transported A images classified into domain B"),
            "functions_mmd_ratio": per_seed("functions_mmd_ratio",
                                            [f[g0]["final"]["mmd2"] / f[g0]["no_transport"] for f in fn],
                                            margin=m.transport_mmd_ratio, direction="<", gates=function_gates,
                                            statement="MMD^2 of transported GP paths to densities over no transport")},
            statement="the final IDBM bridge transports both experiments' source to target on the training grid"),
        all_of("iterations_help", {
            "images": per_seed("images", [(i[lo]["first_equal_steps"]["fd"] - i[lo]["final"]["fd"])
                                          / i[lo]["first_equal_steps"]["fd"] for i in im],
                               margin=m.iterations_gain, gates=image_gates,
                               statement="relative FD-proxy gain of the final iteration over iteration 1 at "
                                         "equal total training steps"),
            "functions": per_seed("functions", [(f[g0]["first_equal_steps"]["mmd2"] - f[g0]["final"]["mmd2"])
                                                / abs(f[g0]["first_equal_steps"]["mmd2"]) for f in fn],
                                  margin=m.iterations_gain, gates=function_gates,
                                  statement="relative MMD^2 gain of the final iteration over iteration 1 at equal "
                                            "total training steps")},
            statement="iterative Markovian fitting beats the independent coupling at equal training steps"),
        all_of("resolution_free", {
            f"images_fd_{hi}": per_seed(f"images_fd_{hi}", [resolution_excess(
                i[lo]["final"]["fd"], i[hi]["final"]["fd"], m.resolution_relative, m.resolution_absolute_fd)
                for i in im], margin=1.0, direction="<", gates=image_gates,
                statement="FD-proxy change from the training grid to 2x, over max(relative x base, absolute)"),
            f"images_accuracy_{hi}": per_seed(f"images_accuracy_{hi}", [abs(
                i[hi]["final"]["domain_accuracy"] - i[lo]["final"]["domain_accuracy"]) / m.resolution_absolute_accuracy
                for i in im], margin=1.0, direction="<", gates=image_gates,
                statement="domain-accuracy change from the training grid to 2x, over the absolute tolerance"),
            **{f"functions_mmd_{n}": per_seed(f"functions_mmd_{n}", [resolution_excess(
                f[g0]["final"]["mmd2"], f[str(n)]["final"]["mmd2"], m.resolution_relative, m.resolution_absolute_mmd)
                for f in fn], margin=1.0, direction="<", gates=function_gates,
                statement=f"MMD^2 change from {g0} to {n} points, over max(relative x base, absolute)")
               for n in grids[1:]}},
            statement="the operator trained on one grid keeps its scores on finer grids without retraining"),
        all_of("densities_valid", {
            "mass_error": per_seed("mass_error", [max(f[str(n)]["final"]["mass_error"] for n in grids) for f in fn],
                                   margin=m.mass_error, direction="<",
                                   statement="mean |integral - 1| of transported functions, worst grid"),
            "negative_mass": per_seed("negative_mass", [max(f[str(n)]["final"]["negative_mass"] for n in grids)
                                                        for f in fn], margin=m.negative_mass, direction="<",
                                      statement="fraction of negative mass of transported functions, worst grid")},
            statement="transported 1-D functions are valid densities without a positivity constraint"),
        all_of("gp_posterior_matches", {
            "mean": per_seed("mean", [r["posterior"]["synthetic"]["mean_error"] for r in rows],
                             margin=m.posterior_mean_error, direction="<",
                             statement="RMS error of the SOC posterior mean over the prior RMS std"),
            "std": per_seed("std", [r["posterior"]["synthetic"]["std_error"] for r in rows],
                            margin=m.posterior_std_error, direction="<",
                            statement="RMS error of the SOC posterior std over the prior RMS std")},
            statement="the relative-entropy SOC control samples the exact GP-regression posterior"),
    ]
    return claims, gates


def headline(rows: list[dict]) -> dict:
    mean = lambda f: float(np.mean([f(r) for r in rows]))
    fn = rows[0]["functions"]
    grids = [str(n) for n in fn["grids"]]
    res = [k for k in rows[0]["images"] if k != "examples"]
    def f(n: str, model: str) -> float:
        value = lambda r: r["functions"][n][model]
        return mean(lambda r: value(r)["mmd2"] if isinstance(value(r), dict) else value(r))

    i = lambda n, model, key: mean(lambda r: r["images"][n][model][key])
    return {
        "functions_mmd2": {**{f"final_{n}": f(n, "final") for n in grids},
                           "iteration1_equal_steps": f(grids[0], "first_equal_steps"),
                           "iteration1": f(grids[0], "first"), "no_transport": f(grids[0], "no_transport"),
                           "floor": f(grids[0], "floor")},
        "densities": {"mass_error": mean(lambda r: max(r["functions"][n]["final"]["mass_error"] for n in grids)),
                      "negative_mass": mean(lambda r: max(r["functions"][n]["final"]["negative_mass"] for n in grids))},
        "images_fd_proxy": {**{f"final_{n}": i(n, "final", "fd") for n in res},
                            "iteration1_equal_steps": i(res[0], "first_equal_steps", "fd"),
                            **{f"no_transport_{n}": i(n, "no_transport", "fd") for n in res},
                            **{f"floor_{n}": i(n, "floor", "fd") for n in res}},
        "images_domain_accuracy": {f"final_{n}": i(n, "final", "domain_accuracy") for n in res},
        "gp_posterior": {k: mean(lambda r: r["posterior"]["synthetic"][k]) for k in ("mean_error", "std_error")},
        "elnino_target_log_lik": {k: mean(lambda r: r["posterior"]["elnino"][f"target_log_lik_{k}"])
                                  for k in ("soc", "exact")},
        "euler_maruyama_max_a_dt": mean(lambda r: r["functions"][grids[-1]]["stiffness"]),
    }
