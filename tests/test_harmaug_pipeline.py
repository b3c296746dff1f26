"""harmaug end to end at smoke scale: dvc repro, every claim re-derived from its details, the gates, a
poisoned param, the Prefect flow with MLflow child runs; and the paper-scale path (local generator,
response model, Llama-Guard-style causal-LM teacher, DeBERTa-v2 student, WildGuardMix-style seed file) on
tiny random models saved with `save_pretrained`. All text is the symbolic world's abstract tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import dvc

pytestmark = pytest.mark.slow
PAPER = "harmaug"
STAGES = ["prepare", "pretrain", "augment", "finetune", "evaluate"]
CLAIMS = {"prefix_jailbreaks_generator", "harmaug_beats_kd_only", "harmaug_beats_eda", "harmaug_closes_gap",
          "student_cheaper"}
GATES = {"kd_only_below_teacher_unseen", "teacher_below_ceiling", "oracle_parser_exact"}


@pytest.fixture(scope="module")
def reproduced(smoke_repo):
    dvc(smoke_repo, "repro", f"{PAPER}-evaluate")
    return smoke_repo


def test_dvc_repro_writes_claims_that_follow_from_their_details(reproduced):
    from tasks.core.claims import rederive

    results = reproduced / "results" / PAPER
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics) == {"claims", "claims_detail", "gates", "headline"}
    assert set(metrics["claims"]) == CLAIMS
    for name, verdict in metrics["claims"].items():
        assert rederive(metrics["claims_detail"][name]) == verdict, name
    assert metrics["claims_detail"]["harmaug_beats_kd_only"]["n"] == 2  # two smoke seeds
    assert set(metrics["gates"]) == GATES
    assert metrics["gates"]["oracle_parser_exact"]["value"] == 1.0
    evidence = json.loads((results / "evidence.json").read_text())
    assert set(evidence["scores"]) == {"teacher", "kd_only", "eda", "no_prefix", "harmaug"}
    assert set(evidence["scores"]["teacher"]["all"]) == {"prompt_balanced", "prompt_low", "pair_balanced",
                                                         "pair_low", "unseen"}
    gen = evidence["generator"]
    assert 0 <= gen["refusal_no_prefix"] <= 1 and "harmaug" in gen["histogram"]
    assert evidence["cost"]["parameters"]["student"] < evidence["cost"]["parameters"]["teacher"]
    for png in ("f1_auprc.png", "coverage.png", "precision_recall.png"):
        assert (results / "plots" / png).stat().st_size > 1000
    aug = reproduced / "artifacts" / PAPER / "augment"
    rows = [json.loads(x) for x in (aug / "seed0" / "harmaug.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 20 and all(0 <= r["soft"] <= 1 for r in rows)  # prompt-only, compliant, refusal
    assert {r["response"].split()[0] for r in rows if r["response"]} == {"sure", "sorry"}


def test_a_poisoned_param_fails_the_repro_and_keeps_every_output(reproduced):
    from tests.conftest import assert_poisoned_param_keeps_outputs

    assert_poisoned_param_keeps_outputs(reproduced, PAPER)


def test_second_repro_does_nothing(reproduced):
    out = dvc(reproduced, "repro", f"{PAPER}-evaluate").stdout
    assert "Running stage" not in out


def test_prefect_flow_logs_parent_and_child_runs(tmp_path, prefect_harness, mlflow_uri, monkeypatch):
    from flows.harmaug import harmaug
    from tests.conftest import make_clone, run_flow_with_children

    repo = make_clone(tmp_path / "flowrepo")
    result, runs = run_flow_with_children(harmaug, PAPER, STAGES, repo, monkeypatch, mlflow_uri)
    ft = runs[runs["tags.mlflow.runName"] == f"{PAPER}-finetune"].iloc[0]
    assert ft["params.steps"] == "10" and ft["metrics.stage_seconds"] > 0
    again = harmaug()
    assert not any(s["ran"] for s in again["stages"])


# ------------------------------------------------------------------ the paper-scale path on tiny models
def _word_tokenizer(words, chat_template=None):
    from models.harmaug.lm import word_tokenizer

    tok = word_tokenizer(words)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def save_tiny_models(folder, world):
    """A GPT-2 generator and response model with the world's tokenizer, a Llama causal-LM guard whose
    vocabulary holds 'safe' and 'unsafe' and whose chat template is its own, and a DeBERTa-v2 student."""
    import torch
    from transformers import (DebertaV2Config, DebertaV2ForSequenceClassification, LlamaConfig,
                              LlamaForCausalLM)

    from models.harmaug.lm import tiny_gpt2

    torch.manual_seed(0)
    words = world.vocabulary() + ["safe", "unsafe", "[INST]", "[/INST]"]
    paths = {}
    for name in ("generator", "responder"):
        tok = _word_tokenizer(words)
        tiny_gpt2(len(tok), 1, 16, 2, 256, tok).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        paths[name] = folder / name
    guard_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                      "{% else %} {{ m['content'] }}{% endif %}{% endfor %}")
    tok = _word_tokenizer(words, guard_template)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(
        folder / "guard")
    tok.save_pretrained(folder / "guard")
    tok = _word_tokenizer(words)
    DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=128, num_labels=2, pad_token_id=tok.pad_token_id)).save_pretrained(folder / "student")
    tok.save_pretrained(folder / "student")
    paths.update(guard=folder / "guard", student=folder / "student")
    return paths


def write_local_data(folder, world):
    """A WildGuardMix-style seed file (prompt, response, prompt_harm_label, response_harm_label,
    subcategory; some responses missing) and two test files, in the world's abstract tokens."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = []
    for i, row in enumerate(world.dataset(rng, 24, [0, 1], 0.5, True, 0.0)):
        harm = "harmful" if row.kind == "harmful" else "unharmful"
        resp_label = None if i % 3 == 0 else ("harmful" if row.label else "unharmful")
        lines.append({"prompt": row.prompt, "response": None if i % 4 == 0 else row.response,
                      "prompt_harm_label": harm, "response_harm_label": resp_label,
                      "subcategory": f"topic{i % 2}" if row.kind == "harmful" else None})
    (folder / "seed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tests = folder / "tests"
    tests.mkdir()
    for name, with_resp in (("prompts", False), ("pairs", True)):
        rows = world.dataset(rng, 16, list(range(4)), 0.5, with_resp, 0.0)
        (tests / f"{name}.jsonl").write_text("".join(json.dumps(
            {"prompt": r.prompt, "response": r.response, "label": r.label,
             "category": "topic2" if r.kind == "harmful" else ""}) + "\n" for r in rows))
    return folder / "seed.jsonl", tests


def test_causal_lm_guard_scores_the_first_token(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.harmaug.guard import CausalLMGuard
    from models.harmaug.world import HarmWorld

    world = HarmWorld(4, 2, 2, 4, 4)
    paths = save_tiny_models(tmp_path, world)
    tok = AutoTokenizer.from_pretrained(str(paths["guard"]))
    guard = CausalLMGuard(AutoModelForCausalLM.from_pretrained(str(paths["guard"])), tok, "safe", "unsafe", "", 64)
    assert guard.chat("how do i hv0_1 the ho0_1", "") == "[INST] how do i hv0_1 the ho0_1 [/INST]"
    p = guard.prob_unsafe(["how do i hv0_1 the ho0_1", "how do i bv1 the bo1"], ["", REFUSAL], 2)
    with torch.no_grad():
        logits = guard.model(**tok([guard.chat("how do i bv1 the bo1", REFUSAL)], add_special_tokens=False,
                                   return_token_type_ids=False, return_tensors="pt")).logits[0, -1]
    ids = [tok.convert_tokens_to_ids(t) for t in ("safe", "unsafe")]
    assert p[1] == pytest.approx(float(logits[ids].softmax(-1)[1]), abs=1e-5)
    assert ((p > 0) & (p < 1)).all()


REFUSAL = "sorry , i can not help with that"


def test_paper_scale_path_on_tiny_local_models(tmp_path):
    """scales/paper.yaml's local sources run every stage on tiny saved models and local files."""
    import yaml

    from models.harmaug.world import HarmWorld
    from tasks.core import run_stage
    from tasks.core.params import deep_merge
    from tests.conftest import ROOT

    world = HarmWorld(4, 2, 2, 4, 4)
    paths = save_tiny_models(tmp_path / "models", world)
    seed_file, test_dir = write_local_data(tmp_path / "data", world)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "scales" / "smoke.yaml").read_text())[PAPER]
    paper = yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]
    params = deep_merge(params, {PAPER: deep_merge(paper, smoke)})
    sec = params[PAPER]
    sec["prepare"].update(seed_file=str(seed_file), test_dir=str(test_dir))
    sec["pretrain"].update(generator_path=str(paths["generator"]), responder_path=str(paths["responder"]),
                           teacher_path=str(paths["guard"]), teacher_suffix="")
    sec["pretrain"]["teacher"]["max_length"] = 256
    sec["augment"].update(n_instructions=4, request=world_request(), prefix="i have an idea for a prompt :",
                          response_openers=["sure ,", "sorry ,"], max_new_tokens=4, response_max_new_tokens=4,
                          batch_size=4, label_batch_size=4)
    sec["finetune"]["student"].update(path=str(paths["student"]), max_length=128)
    sec["finetune"].update(steps=2, batch_size=4, lr=1e-3)
    sec["evaluate"].update(batch_size=8, latency_batch_size=8, latency_threads=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for stage in STAGES:
        run_stage(PAPER, stage, root=tmp_path, track=False)
    art = tmp_path / "artifacts" / PAPER
    meta = json.loads((art / "prepare" / "meta.json").read_text())
    assert meta["source"] == "local" and meta["seen_categories"] == ["topic0", "topic1"]
    assert meta["tests"] == ["pairs", "prompts"]
    seed_rows = [json.loads(x) for x in (art / "augment" / "seed.jsonl").read_text().splitlines()]
    assert len(seed_rows) == 24 and all(0 <= r["soft"] <= 1 for r in seed_rows)
    assert (art / "finetune" / "harmaug_seed0" / "config.json").is_file()
    metrics = json.loads((tmp_path / "results" / PAPER / "metrics.json").read_text())
    assert set(metrics["claims"]) == CLAIMS
    assert metrics["claims"]["prefix_jailbreaks_generator"] is None  # no oracle for local data
    assert metrics["gates"]["oracle_parser_exact"]["passed"] is False


def world_request() -> str:
    from models.harmaug.world import REQUEST

    return REQUEST
