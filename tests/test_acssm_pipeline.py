"""acssm end to end at smoke scale (dvc repro, the Prefect flow), bad params, and the paper-scale loaders
on tiny files in the published formats that the test writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, dvc

PAPER = "acssm"
STAGES = ["prepare", "ablation", "finetune", "speed", "evaluate"]
CLAIMS = {"acssm_beats_baselines_interpolation", "acssm_beats_baselines_extrapolation",
          "acssm_beats_baselines_classification", "acssm_beats_baselines_regression",
          "acssm_beats_trivial", "simulation_free_speedup"}
REFERENCES = {"classification": ["majority_class"], "regression": ["last_value", "linear_interpolation"],
              "interpolation": ["linear_interpolation", "last_value"], "extrapolation": ["last_value"]}


def _smoke_params() -> dict:
    from tasks.core.params import deep_merge

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(params, {PAPER: yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]})


@pytest.mark.slow
def test_dvc_repro_writes_metrics_claims_and_plots(smoke_repo):
    from tasks.core.claims import rederive
    from tasks.core.context import HEADLINE_LIMIT, _count_leaves

    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    res = smoke_repo / "results" / PAPER
    metrics = json.loads((res / "metrics.json").read_text())
    evidence = json.loads((res / "evidence.json").read_text())
    assert set(metrics["claims"]) == CLAIMS
    assert set(metrics) == {"claims", "claims_detail", "gates", "headline"}
    assert _count_leaves(metrics["headline"]) <= HEADLINE_LIMIT
    margins = yaml.safe_load((smoke_repo / "params.yaml").read_text())[PAPER]["evaluate"]
    # every verdict follows from its own CI, margin and gate
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
    # the gates: ACSSM's skill over the task's trivial reference, from the numbers stored beside them
    test, seeds = evidence["test"], evidence["seeds"]
    assert seeds == [0, 1]
    for task, trivial in (("classification", "majority_class"), ("regression", "last_value"),
                          ("interpolation", "linear_interpolation"), ("extrapolation", "last_value")):
        g = metrics["gates"][f"{task}_skill_over_{trivial}"]
        a, ref = test[task]["acssm"]["mean"], test[task][trivial]["mean"]
        skill = (a - ref) / (1 - ref) if task == "classification" else 1 - a / ref
        assert g["value"] == pytest.approx(skill, abs=1e-5) and g["threshold"] == margins["min_skill"]
        assert g["passed"] == (skill >= margins["min_skill"])
        # claims are paired per seed against each baseline, from the per-seed scores beside them
        detail = evidence["claims"][f"acssm_beats_baselines_{task}"]  # the long form holds every part
        assert set(detail["parts"]) == {"gru_dt", "latent_sde"}
        for base, part in detail["parts"].items():
            sign = 1 if task == "classification" else -1
            diffs = [sign * (x - y) for x, y in zip(test[task]["acssm"]["per_seed"], test[task][base]["per_seed"])]
            assert part["effect"] == pytest.approx(np.mean(diffs), abs=1e-5) and part["n"] == len(seeds)
            assert part["margin"] == margins["accuracy_margin" if task == "classification" else "mse_margin"]
            if not g["passed"]:
                assert part["verdict"] is None and part["gate"] == f"{task}_skill_over_{trivial}"
        means = {m: test[task][m]["mean"] for m in ("acssm", "gru_dt", "latent_sde")}
        if metrics["claims"][f"acssm_beats_baselines_{task}"]:    # a CI win is also a win on the means
            better = max if task == "classification" else min
            assert better(means, key=means.get) == "acssm"
    # every trivial reference of every task, ACSSM's per-seed skill over it
    trivial = evidence["claims"]["acssm_beats_trivial"]["parts"]
    assert set(trivial) == {f"{t}_{r}" for t, refs in REFERENCES.items() for r in refs}
    for t, refs in REFERENCES.items():
        for r in refs:
            ref = test[t][r]["mean"]
            skills = [(a - ref) / (1 - ref) if t == "classification" else 1 - a / ref
                      for a in test[t]["acssm"]["per_seed"]]
            part = trivial[f"{t}_{r}"]
            assert part["effect"] == pytest.approx(np.mean(skills), abs=1e-5)
            assert part["margin"] == margins["trivial_margin"] and part["n"] == len(seeds)
    # the no-skip ablation, paired per seed
    for t, ab in evidence["skip_ablation"].items():
        sign = 1 if t == "classification" else -1
        gains = [sign * (a - b) for a, b in zip(test[t]["acssm"]["per_seed"], test[t]["acssm_noskip"]["per_seed"])]
        assert ab["skip_gain"] == pytest.approx(np.mean(gains), abs=1e-6) and ab["n"] == len(seeds)
    # the speed claim: one latent SDE / ACSSM ratio per timing round of the speed stage, at claim_steps
    speed = metrics["claims_detail"]["simulation_free_speedup"]
    raw = evidence["speed_raw"]
    assert raw["claim_steps"] == 8 and raw["steps"] == [4, 8] and len(raw["acssm_seconds"]) == 2
    ratios = [s / a for s, a in zip(raw["latent_sde_seconds"]["8"], raw["acssm_seconds"])]
    assert speed["effect"] == pytest.approx(np.mean(ratios), abs=1e-5)
    assert speed["margin"] == margins["speedup_factor"] and speed["n"] == 2
    assert (res / "plots" / "speed_sweep.png").stat().st_size > 1000
    # no wall-clock numbers in finetune's outputs (they would differ run to run)
    fit = smoke_repo / "artifacts" / PAPER / "finetune"
    assert "sec" not in (fit / "runs.json").read_text()
    assert "seconds" not in (fit / "regression" / "acssm" / "seed0" / "history.json").read_text()
    for png in ("trajectories_regression.png", "latent_interpolation.png"):
        assert (res / "plots" / png).stat().st_size > 1000
    assert json.loads((res / "curves" / "latent_variance_regression.json").read_text())
    # the lambda sweep: the ablation stage's per-value scores, published by evaluate (no claim reads it)
    sweep = json.loads((res / "lambda_sweep.json").read_text())
    assert evidence["lambda_sweep"] == sweep and sweep["task"] == "regression" and sweep["seeds"] == [0, 1]
    assert [r["lambda"] for r in sweep["rows"]] == [1e-6, 1.0] and sweep["reference_lambda"] == 1e-6
    for r in sweep["rows"]:
        assert r["n"] == 2 and r["mean"] == pytest.approx(np.mean(r["per_seed"])) and r["ci"][0] <= r["mean"]
    ref = sweep["rows"][0]["per_seed"]
    assert sweep["rows"][1]["gain_vs_reference"] == pytest.approx(
        np.mean([b - a for a, b in zip(sweep["rows"][1]["per_seed"], ref)]))       # MSE reduction, paired
    assert (res / "plots" / "lambda_sweep.png").stat().st_size > 1000
    assert len(json.loads((res / "curves" / "lambda_sweep.json").read_text())) == 2
    assert "lambda_sweep" not in json.dumps(metrics)                           # metrics.json: claims only
    meta = json.loads((smoke_repo / "artifacts" / PAPER / "prepare" / "meta.json").read_text())
    assert meta["interpolation"]["channels"] == ["co2_ppm", "elnino_sst_c"]
    out = dvc(smoke_repo, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out


def _scores(acssm, gru, sde, trivial, task="regression"):
    from tasks.acssm.evaluate import TRIVIAL, Scores

    return Scores(seeds=list(range(len(acssm))),
                  per_seed={task: {"acssm": acssm, "gru_dt": gru, "latent_sde": sde}},
                  trivial={task: {TRIVIAL[task]: trivial}})


def _params(**kw):
    from tasks.acssm.evaluate import EvaluateParams

    return EvaluateParams(**{**dict(speedup_factor=5.0, accuracy_margin=0.0, mse_margin=0.0, trivial_margin=0.0,
                                    min_skill=0.0, n_plot_series=1), **kw})


def _claim(claims, name):
    return next(c for c in claims if c.name == name)


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(smoke_repo):
    from tests.conftest import assert_poisoned_param_keeps_outputs, dvc as _dvc

    _dvc(smoke_repo, "repro", f"{PAPER}-evaluate")  # up to date after the test above
    assert_poisoned_param_keeps_outputs(smoke_repo, PAPER)


def test_beats_baselines_needs_a_per_seed_ci_past_the_margin_for_every_baseline():
    from tasks.acssm.evaluate import decide_claims

    clear = _scores([0.50, 0.52, 0.51], [0.60, 0.63, 0.61], [0.55, 0.57, 0.56], trivial=1.0)
    (claim, _), (g,) = decide_claims(clear, None, _params())
    assert claim.verdict is True and g.passed and set(claim.parts) == {"gru_dt", "latent_sde"}
    assert claim.parts["latent_sde"].effect == pytest.approx(0.05)            # MSE reduction, paired
    (claim, _), _ = decide_claims(clear, None, _params(mse_margin=0.06))          # margin beyond the effect
    assert claim.verdict is False
    noisy = _scores([0.50, 0.60, 0.52], [0.70, 0.75, 0.72], [0.52, 0.57, 0.55], trivial=1.0)
    (claim, _), _ = decide_claims(noisy, None, _params())                         # wins on the mean, CI straddles 0
    assert np.mean(noisy.per_seed["regression"]["acssm"]) < np.mean(noisy.per_seed["regression"]["latent_sde"])
    assert claim.verdict is False and claim.parts["gru_dt"].verdict is True
    accuracy = _scores([0.70, 0.72, 0.71], [0.60, 0.61, 0.60], [0.65, 0.66, 0.64], 0.2, task="classification")
    (claim, _), (g,) = decide_claims(accuracy, None, _params())               # higher is better
    assert claim.verdict is True and g.value == pytest.approx((0.71 - 0.2) / 0.8)


def test_a_model_worse_than_the_trivial_reference_makes_the_claim_untestable():
    from tasks.acssm.evaluate import decide_claims

    (claim, _), (g,) = decide_claims(_scores([0.5, 0.52], [0.6, 0.63], [0.55, 0.58], trivial=0.4), None,
                                     _params())
    assert not g.passed and g.value == pytest.approx(1 - 0.51 / 0.4)
    assert claim.verdict is None and "skill" in claim.reason


def test_speedup_claim_is_the_per_round_ratio_at_the_claim_steps():
    from tasks.acssm.evaluate import decide_claims, speed_summary

    scores = _scores([0.5, 0.5, 0.5], [0.6, 0.6, 0.6], [0.6, 0.6, 0.6], trivial=1.0)
    speed = {"task": "regression", "series": 10, "points": 50, "horizon": 5.0, "batch_size": 5,
             "train_samples": 3, "threads": 1, "steps": [100, 200], "claim_steps": 200,
             "sde_dt": {"100": 0.05, "200": 0.025}, "acssm_seconds": [1.0, 2.0, 1.0],
             "latent_sde_seconds": {"100": [3.0, 6.0, 3.1], "200": [6.0, 12.4, 5.9]}}
    speedup = _claim(decide_claims(scores, speed, _params())[0], "simulation_free_speedup")
    assert speedup.verdict is True and speedup.n == 3 and speedup.effect == pytest.approx(6.0333, abs=1e-3)
    speedup = _claim(decide_claims(scores, speed, _params(speedup_factor=6.05))[0], "simulation_free_speedup")
    assert speedup.verdict is False                                            # the mean is under the margin
    summary = speed_summary(speed)
    assert summary["per_steps"]["100"]["ratio"] == pytest.approx((3 + 3 + 3.1) / 3)
    assert summary["per_steps"]["200"]["acssm_sec"] == 1.0 and summary["rounds"] == 3


def test_beats_trivial_needs_every_reference_of_every_task():
    from tasks.acssm.evaluate import Scores, decide_claims

    row = {"acssm": [0.50, 0.52, 0.51], "gru_dt": [0.6] * 3, "latent_sde": [0.6] * 3}
    scores = Scores(seeds=[0, 1, 2], per_seed={"regression": row, "classification": {
        "acssm": [0.70, 0.72, 0.71], "gru_dt": [0.6] * 3, "latent_sde": [0.6] * 3}},
        trivial={"regression": {"last_value": 0.80, "linear_interpolation": 0.60},
                 "classification": {"majority_class": 0.20}})
    trivial = _claim(decide_claims(scores, None, _params())[0], "acssm_beats_trivial")
    assert trivial.verdict is True and set(trivial.parts) == {
        "regression_last_value", "regression_linear_interpolation", "classification_majority_class"}
    assert trivial.parts["regression_linear_interpolation"].effect == pytest.approx(1 - 0.51 / 0.60)
    assert trivial.parts["classification_majority_class"].effect == pytest.approx((0.71 - 0.2) / 0.8)
    assert trivial.weakest == "regression_linear_interpolation"
    scores.trivial["regression"]["linear_interpolation"] = 0.515              # one reference ties ACSSM
    assert _claim(decide_claims(scores, None, _params())[0], "acssm_beats_trivial").verdict is False
    tight = _claim(decide_claims(scores, None, _params(trivial_margin=0.5))[0], "acssm_beats_trivial")
    assert tight.verdict is False


def test_trivial_references_on_hand_made_series():
    import torch

    from tasks.acssm.evaluate import trivial_scores

    nan = float("nan")
    test = {"times": torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "values": torch.tensor([[[1.0], [nan], [3.0], [nan]]]),
            "mask": torch.tensor([[[1.0], [0.0], [1.0], [0.0]]]), "target": torch.tensor([[[1.0], [2.0], [3.0], [4.0]]]),
            "target_mask": torch.tensor([[[0.0], [1.0], [0.0], [1.0]]]), "valid": torch.ones(1, 4, dtype=torch.bool)}
    ref = trivial_scores("interpolation", test, test)
    assert ref["linear_interpolation"] == pytest.approx((0.0 + 1.0) / 2)     # predicts 2 and 3
    assert ref["last_value"] == pytest.approx((1.0 + 1.0) / 2)               # predicts 1 and 3
    train = {"target": torch.tensor([[2, 2, 1]]), "target_mask": torch.ones(1, 3)}
    labels = {"target": torch.tensor([[1, 2, 2, 0]]), "target_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0]])}
    assert trivial_scores("classification", train, labels) == {"majority_class": pytest.approx(2 / 3)}


def test_skip_ablation_is_paired_per_seed():
    from tasks.acssm.evaluate import Scores, skip_ablation

    scores = Scores(seeds=[0, 1, 2], per_seed={"regression": {"acssm": [0.50, 0.52, 0.51],
                                                              "acssm_noskip": [0.60, 0.61, 0.62]}},
                    trivial={"regression": {"last_value": 1.0}})
    ab = skip_ablation(scores)["regression"]
    assert ab["skip_gain"] == pytest.approx(0.1) and ab["ci"][0] > 0 and ab["n"] == 3
    assert ab["noskip_skill_over_trivial"] == pytest.approx(1 - 0.61)


@pytest.mark.slow
def test_prefect_flow_runs_every_stage_with_mlflow_children(tmp_path, prefect_harness, mlflow_uri,
                                                                 monkeypatch):
    import mlflow

    from flows.acssm import acssm
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo", papers=[PAPER])
    result, runs = run_flow_with_children(acssm, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    fin = runs[runs["tags.mlflow.runName"] == f"{PAPER}-finetune"].iloc[0]
    assert fin["tags.gpu_stage"] == "true" and fin["params.lambda_control"] == "1e-06"


@pytest.mark.parametrize("section, key, value, msg", [
    ("finetune", "epochs", 0, "acssm.finetune.epochs"),
    ("finetune", "models", ["acssm", "lstm"], "acssm.finetune.models"),
    ("finetune", "epoch", 3, "is not a parameter"),
    ("prepare", "missing", 1.5, "acssm.prepare.missing"),
    ("evaluate", "speedup_factor", 0.5, "acssm.evaluate.speedup_factor"),
    ("evaluate", "mse_margin", -0.1, "acssm.evaluate.mse_margin"),
    ("evaluate", "trivial_margin", 1.0, "acssm.evaluate.trivial_margin"),
    ("speed", "claim_steps", 3, "claim_steps"),
    ("speed", "repeats", 1, "acssm.speed.repeats"),
    ("ablation", "reference_lambda", 0.5, "reference_lambda"),
    ("ablation", "lambdas", [1.0e-6, 1.0e-6], "distinct"),
    ("ablation", "seeds", [0], "acssm.ablation.seeds"),
    ("finetune", "per_task", {"forecast": {}}, "acssm.finetune.per_task"),
    ("finetune", "per_task", {"regression": {"epochs": 3}}, "acssm.finetune.per_task.regression.batch_size"),
    ("finetune", "encoder", "rnn", "acssm.finetune.encoder"),
])
def test_bad_params_are_rejected_before_any_compute(tmp_path, section, key, value, msg):
    from tasks.core import ParamsError, run_stage

    params = _smoke_params()
    params[PAPER][section][key] = value
    with pytest.raises(ParamsError, match=msg):
        run_stage(PAPER, section, root=tmp_path, params=params, track=False)
    assert not (tmp_path / "artifacts" / PAPER / section).exists()


# --------------------------------------------------------------------------------------------------
# paper scale: tiny files in the published formats
# --------------------------------------------------------------------------------------------------
def _write_paper_files(root):
    rng = np.random.default_rng(0)
    (root / "ushcn").mkdir(parents=True)
    lines = ["ID,Time," + ",".join(f"Value_{c}" for c in range(5)) + "," + ",".join(f"Mask_{c}" for c in range(5))]
    for sid in range(6):
        for t in sorted(rng.choice(100, 12, replace=False)):
            m = (rng.random(5) > 0.3).astype(int)
            m[0] = 1
            lines.append(f"{sid},{t * 0.1:.1f}," + ",".join(f"{v:.3f}" for v in rng.normal(size=5)) + ","
                         + ",".join(str(x) for x in m))
    (root / "ushcn" / "small_chunked_sporadic.csv").write_text("\n".join(lines) + "\n")
    (root / "physionet" / "set-a").mkdir(parents=True)
    for rec in range(3):
        rows = ["Time,Parameter,Value", "00:00,RecordID,13254" + str(rec), "00:00,Age,54", "00:00,Gender,0"]
        for k in range(8):
            rows += [f"{k:02d}:{(7 * k) % 60:02d},HR,{70 + k}", f"{k:02d}:{(7 * k) % 60:02d},Temp,{36.5 + 0.1 * k}"]
        rows.append("03:21,HR,80")                               # duplicate time: averaged
        (root / "physionet" / "set-a" / f"13254{rec}.txt").write_text("\n".join(rows) + "\n")
    (root / "activity").mkdir(parents=True)
    rows = []
    tags = ["010-000-024-033", "010-000-030-096", "020-000-033-111", "020-000-032-221"]
    for seq in ("A01", "A02"):
        for k in range(120):
            ms = k * 100
            stamp = f"27.05.2009 14:{3 + ms // 60000:02d}:{(ms // 1000) % 60:02d}:{ms % 1000:03d}"
            act = "walking" if k < 60 else "sitting"
            rows.append(f"{seq},{tags[k % 4]},6337902260{k:08d},{stamp},{rng.normal():.4f},{rng.normal():.4f},"
                        f"{rng.normal():.4f},{act}")
    (root / "activity" / "ConfLongDemo_JSI.txt").write_text("\n".join(rows) + "\n")
    (root / "pendulum").mkdir(parents=True)
    np.savez(root / "pendulum" / "pendulum.npz",
             obs=rng.integers(0, 255, (10, 12, 6, 6, 1), dtype=np.uint8),
             targets=rng.normal(size=(10, 12, 2)).astype(np.float32),
             obs_valid=rng.random((10, 12)) > 0.2)


def test_paper_loaders_read_the_published_formats(tmp_path):
    from models.acssm.sde import check_series
    from tasks.acssm import paper_data as paper

    _write_paper_files(tmp_path)
    ushcn = paper.load_ushcn(tmp_path / "ushcn" / "small_chunked_sporadic.csv")
    assert ushcn["values"].shape == (6, 12, 5) and ushcn["mask"][:, :, 0].all()
    phys = paper.load_physionet(tmp_path / "physionet" / "set-a")
    hr = paper.PHYSIONET_PARAMS.index("HR")
    assert phys["values"].shape[2] == 37 and phys["mask"][:, :, hr].sum() == 3 * 8
    k = int(np.argmin(np.abs(phys["times"][0] - (3 + 21 / 60))))
    assert phys["values"][0, k, hr] == pytest.approx((73 + 80) / 2)      # repeated readings averaged
    act = paper.load_activity(tmp_path / "activity" / "ConfLongDemo_JSI.txt", window=50)
    assert act["values"].shape[1:] == (50, 12) and set(np.unique(act["target"])) <= {0, 3}
    pend, image_shape = paper.load_pendulum(tmp_path / "pendulum" / "pendulum.npz")
    assert pend["values"].shape == (10, 12, 36) and np.nanmax(pend["values"]) <= 1.0
    assert image_shape == [1, 6, 6]                                   # channels-last frames -> C, H, W
    import torch
    for d in (ushcn, phys, act, pend):
        check_series(torch.as_tensor(d["times"]), torch.as_tensor(d["values"]), torch.as_tensor(d["mask"]),
                     torch.as_tensor(d["valid"]))
    built, extra = paper.build_all(tmp_path, seed=0)
    assert set(built) == set(extra) == {"classification", "regression", "interpolation", "extrapolation"}
    assert extra["regression"]["image_shape"] == [1, 6, 6] and "image_shape" not in extra["classification"]
    ex = built["extrapolation"]["train"]
    assert (ex["target_mask"].sum((1, 2)) > 0).all() and ((ex["mask"] * ex["target_mask"]).sum() == 0)


def test_paper_loaders_reject_malformed_files(tmp_path):
    from tasks.acssm import paper_data as paper

    (tmp_path / "u.csv").write_text("ID,Time," + ",".join(f"Value_{c}" for c in range(5)) + ","
                                    + ",".join(f"Mask_{c}" for c in range(5)) + "\n"
                                    + "0,1.0,1,1,1,1,1,1,1,1,1,1\n0,1.0,1,1,1,1,1,1,1,1,1,1\n")
    with pytest.raises(ValueError, match="duplicate or unsorted"):
        paper.load_ushcn(tmp_path / "u.csv")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "1.txt").write_text("Hour,Param,Val\n")
    with pytest.raises(ValueError, match="expected header"):
        paper.load_physionet(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no paper data set"):
        paper.build_all(tmp_path / "nothing", 0)


def _paper_params() -> dict:
    from tasks.core.params import deep_merge

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(params, {PAPER: yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]})


def test_paper_scale_params_hold_the_papers_per_task_configs():
    from tasks.acssm.ablation import AblationParams
    from tasks.acssm.finetune import FinetuneParams, settings_for
    from tasks.acssm.speed import SpeedParams

    section = _paper_params()[PAPER]
    p = FinetuneParams.model_validate(section["finetune"])
    SpeedParams.model_validate(section["speed"])
    AblationParams.model_validate(section["ablation"])
    assert set(p.per_task) == {"classification", "regression", "interpolation", "extrapolation"}
    activity, pendulum = settings_for(p, "classification"), settings_for(p, "regression")
    assert (activity.model["state_dim"], activity.model["num_basis"], activity.model["n_layers"]) == (288, 256, 1)
    assert activity.model["dropout"] == 0.2 and activity.batch_size == 256 and activity.epochs == 400
    assert activity.grad_clip == 1.0 and pendulum.grad_clip == 0.0               # clipping on activity only
    assert (pendulum.model["state_dim"], pendulum.model["num_basis"], pendulum.model["n_layers"]) == (20, 15, 4)
    assert pendulum.model["init_sigma"] == 10.0 and pendulum.epochs == 500 and p.encoder == "cnn"
    assert settings_for(p, "interpolation").weight_decay == 0.0
    # the CPU scale has one config for every task
    cpu = FinetuneParams.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]["finetune"])
    assert cpu.per_task == {} and settings_for(cpu, "classification").model == settings_for(cpu, "regression").model


def test_cpu_scale_lambda_sweep_trains_finetunes_acssm_except_lambda_and_epochs():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER]
    fin, ab = section["finetune"], section["ablation"]
    shared = set(fin) & set(ab) - {"seeds", "epochs", "workers"}
    assert {k: ab[k] for k in shared} == {k: fin[k] for k in shared}
    assert fin["lambda_control"] == ab["reference_lambda"] in ab["lambdas"]
    assert fin["lambda_potential"] == pytest.approx(ab["potential_ratio"] * ab["reference_lambda"])


def test_lambda_sweep_summary_on_hand_made_numbers():
    from tasks.acssm.ablation import summarise

    scores = {1e-6: [0.50, 0.52, 0.51], 1.0: [0.60, 0.61, 0.62]}
    control = {1e-6: [4.0, 5.0, 6.0], 1.0: [0.1, 0.2, 0.3]}
    rows = summarise([1e-6, 1.0], 1e-6, scores, control, higher_is_better=False)
    assert [r["lambda"] for r in rows] == [1e-6, 1.0]
    assert rows[0]["mean"] == pytest.approx(0.51) and rows[0]["gain_vs_reference"] == 0.0
    assert rows[1]["gain_vs_reference"] == pytest.approx(-0.10)                   # MSE up by 0.10: a loss
    assert rows[1]["gain_ci"][1] < 0 and rows[1]["control_cost"] == pytest.approx(0.2)
    half = 4.302653 * 0.01 / np.sqrt(3)                                           # t(0.975, 2) * sd / sqrt(n)
    assert rows[1]["ci"] == pytest.approx([0.61 - half, 0.61 + half], abs=1e-5)
    acc = summarise([1e-6, 1.0], 1e-6, scores, control, higher_is_better=True)
    assert acc[1]["gain_vs_reference"] == pytest.approx(0.10)


def _tiny_per_task(**kw) -> dict:
    return {**dict(epochs=2, batch_size=64, lr=0.01, weight_decay=0.0, grad_clip=0.0, state_dim=3, num_basis=5,
                   n_layers=2, dropout=0.1, time_scale=0.5, init_sigma=10.0), **kw}


@pytest.mark.slow
def test_paper_scale_prepare_and_finetune_on_tiny_files(tmp_path):
    """The paper-scale path on tiny files: the pendulum frames go through the conv encoder, and each
    task's own settings (per_task) reach its model and its training loop."""
    from safetensors.torch import load_file

    from tasks.core import run_stage

    data = tmp_path / "data"
    _write_paper_files(data)
    params = _smoke_params()
    params[PAPER]["prepare"].update(source="paper", data_dir=str(data))
    params[PAPER]["finetune"].update(tasks=["classification", "regression", "extrapolation"], models=["acssm"],
                                     seeds=[0], encoder="cnn",
                                     per_task={"regression": _tiny_per_task(),
                                               "classification": _tiny_per_task(epochs=1, state_dim=6, num_basis=2,
                                                                                n_layers=1)})
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in ("prepare", "finetune"):
        run_stage(PAPER, stage, root=tmp_path, params=params, track=False)
    meta = json.loads((tmp_path / "artifacts" / PAPER / "prepare" / "meta.json").read_text())
    assert meta["classification"]["obs_dim"] == 12 and meta["extrapolation"]["obs_dim"] == 5
    assert meta["regression"]["image_shape"] == [1, 6, 6] and meta["classification"]["image_shape"] is None
    fit = tmp_path / "artifacts" / PAPER / "finetune"
    pend = load_file(fit / "regression" / "acssm" / "seed0" / "model.safetensors")
    assert pend["encoder.embed.conv.0.weight"].shape[1] == 2                    # [frame, mask] channels
    assert pend["sde.log_rates"].shape == (5, 3) and "encoder.transformer.layers.1.linear1.weight" in pend
    assert pend["sde.logvar0"][0].item() == pytest.approx(np.log(10.0), abs=0.1)   # init_sigma (after 2 epochs)
    assert len(json.loads((fit / "regression" / "acssm" / "seed0" / "history.json").read_text())) == 2
    act = load_file(fit / "classification" / "acssm" / "seed0" / "model.safetensors")
    assert act["sde.log_rates"].shape == (2, 6) and "encoder.embed.0.weight" in act    # vectors: the MLP
    assert len(json.loads((fit / "classification" / "acssm" / "seed0" / "history.json").read_text())) == 1
    ex = load_file(fit / "extrapolation" / "acssm" / "seed0" / "model.safetensors")   # shared settings
    assert ex["sde.log_rates"].shape == (params[PAPER]["finetune"]["num_basis"], params[PAPER]["finetune"]["state_dim"])
