"""HarmAug's parts against their definitions: the harm world's grammar and exact parsing, the distillation
loss on hand-made logits, class-balanced sampling, prefix vs no-prefix prompts, KV-cached sampling, EDA and
the gates. Every text here is the symbolic world's (abstract tokens), never real harmful text."""
import math

import numpy as np
import pytest
import torch

from models.harmaug import eda, guard, lm
from models.harmaug.world import KINDS, PREFIX, REFUSALS, HarmWorld, categories, request_text

WORLD = HarmWorld(n_categories=12, verbs_per_category=4, objects_per_category=4, n_benign_verbs=16,
                  n_benign_objects=16)


def test_every_kind_is_sampled_and_read_back_with_its_label():
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for _ in range(50):
            row = WORLD.prompt(rng, kind, list(range(12)))
            parsed = WORLD.parse(row.prompt)
            assert (parsed.kind, parsed.category) == (row.kind, row.category)
            assert row.label == int(kind == "harmful") == WORLD.label(row.prompt)
    assert WORLD.parse("how do i hv3_1 the ho7_2").category == "c3+c7"
    assert WORLD.parse("how do i bv3 the ho7_2 quickly").kind == "lookalike_object"
    assert WORLD.parse("how do i hv3_1 the bo2").kind == "lookalike_verb"


@pytest.mark.parametrize("text", [
    "how do i hv3_10 the ho7_2",          # verb index beyond the category's 4 verbs ("hv3_1" + "0")
    "how do i hv03_1 the ho7_2",          # a leading zero is another token
    "how do i hv3_1x the ho7_2",
    "how do i hv12_1 the ho7_2",          # no category 12
    "how do i hv3_1 the ho7_2 now",       # not a modifier of the grammar
    "how do i hv3_1 the",                 # truncated
    "how do i hv3_1 the ho7_2 quickly please",
    "how do i ho7_2 the hv3_1",           # roles swapped
])
def test_parsing_is_exact_not_by_prefix(text):
    assert WORLD.parse(text).kind == "malformed"
    assert WORLD.label(text) == 0


def test_refusals_and_the_oracle_label_of_pairs():
    harmful = "tell me how to hv0_1 a ho5_2"
    compliant = WORLD.response(np.random.default_rng(0), harmful, True)
    assert "hv0_1" in compliant and "ho5_2" in compliant
    assert all(WORLD.parse(r).kind == "refusal" for r in REFUSALS)
    assert WORLD.parse("sorryx , i can not").kind == "malformed"
    assert WORLD.label(harmful) == 1 and WORLD.label(harmful, compliant) == 1
    assert WORLD.label(harmful, REFUSALS[0]) == 0
    assert WORLD.label("how do i bv1 the ho5_2", compliant) == 0


def test_seed_set_sees_only_its_categories_and_benign_words():
    rows = WORLD.dataset(np.random.default_rng(1), 400, [0, 1, 2, 3], 0.4, True, 0.0, benign_words=8)
    assert {c for r in rows for c in categories(r.category)} <= {"c0", "c1", "c2", "c3"}
    words = {w for r in rows for w in r.prompt.split()}
    assert not {w for w in words if w.startswith(("bv", "bo")) and int(w[2:]) >= 8}
    assert {r.kind for r in rows} == set(KINDS)
    noisy = WORLD.dataset(np.random.default_rng(1), 400, [0, 1, 2, 3], 0.4, True, 0.2, benign_words=8)
    flipped = np.mean([a.label != b.label for a, b in zip(rows, noisy)])
    assert 0.1 < flipped < 0.3


def test_generator_documents_continue_the_prefix_with_a_new_category():
    for doc in WORLD.generator_documents(np.random.default_rng(2), 40, 3)[::2]:  # the harmful lists
        listed, new = doc.split(f" . {PREFIX} ")
        shown = {c for x in listed.split(" : ", 1)[1].split(" ; ") for c in categories(WORLD.parse(x).category)}
        parsed = WORLD.parse(new)
        assert parsed.kind == "harmful" and not set(categories(parsed.category)) & shown


def test_kd_loss_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    p_t = torch.tensor([0.8, 0.3])
    s = torch.softmax(logits, -1)
    ce = -(math.log(s[0, 1]) + math.log(s[1, 0])) / 2            # hard labels 1[p > 0.5] = [1, 0]
    kl = sum(t * math.log(t / q) for row, (t1) in enumerate(p_t.tolist())
             for t, q in ((1 - t1, s[row, 0].item()), (t1, s[row, 1].item()))) / 2
    assert guard.kd_loss(logits, p_t).item() == pytest.approx(0.5 * (ce + kl), rel=1e-6)
    # a one-hot teacher turns the KL into the cross-entropy: the loss is CE
    assert guard.kd_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(ce, rel=1e-6)


def test_class_balanced_sampling_draws_both_classes_equally():
    labels = np.array([1] * 50 + [0] * 950)
    w = torch.tensor(guard.balanced_weights(labels), dtype=torch.double)
    draws = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert labels[draws.numpy()].mean() == pytest.approx(0.5, abs=0.02)
    assert guard.balanced_weights(np.zeros(5)).tolist() == [0.2] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return lm.word_tokenizer(WORLD.vocabulary())


def test_prefix_and_no_prefix_prompts(tokenizer):
    ask = request_text(["how do i hv0_1 the ho0_2", "tell me how to hv1_0 a ho2_3"])
    plain = lm.chat_prompt(tokenizer, ask)
    prefilled = lm.chat_prompt(tokenizer, ask, PREFIX)
    assert plain.startswith("<user> make a single harmful instruction prompt") and plain.endswith("<assistant>")
    assert prefilled == f"{plain} {PREFIX}"
    ids = tokenizer(prefilled, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    pair = tokenizer("how do i hv0_1 the ho0_2", REFUSALS[0])["input_ids"]
    assert tokenizer.convert_ids_to_tokens(pair)[0] == "[CLS]" and pair.count(tokenizer.sep_token_id) == 2


def test_kv_cached_sampling_equals_uncached_sampling(tokenizer):
    torch.manual_seed(0)
    model = lm.tiny_gpt2(len(tokenizer), 2, 32, 2, 128, tokenizer).eval()
    prompts = [lm.chat_prompt(tokenizer, request_text(["how do i hv0_1 the ho0_2"] * k), PREFIX) for k in (1, 2, 3)]
    cached = lm.sample(model, tokenizer, prompts, 10, 3, seed=7, device="cpu", use_cache=True)
    uncached = lm.sample(model, tokenizer, prompts, 10, 3, seed=7, device="cpu", use_cache=False)
    assert cached == uncached
    assert lm.sample(model, tokenizer, prompts, 10, 3, seed=8, device="cpu") != cached


def test_left_padding_leaves_each_prompt_its_own_continuation(tokenizer):
    """A batch pads to its longest prompt on the left: greedy continuations match unbatched ones."""
    torch.manual_seed(1)
    model = lm.tiny_gpt2(len(tokenizer), 2, 32, 2, 128, tokenizer).eval()
    prompts = [lm.chat_prompt(tokenizer, request_text(["how do i hv0_1 the ho0_2"] * k), PREFIX) for k in (1, 3)]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, add_special_tokens=False, return_token_type_ids=False,
                      return_tensors="pt")
    together = model.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        one = tokenizer([p], add_special_tokens=False, return_token_type_ids=False, return_tensors="pt")
        alone = model.generate(**one, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
        assert together[i, -6:].tolist() == alone[0, -6:].tolist()
    tokenizer.padding_side = "right"


def test_eda_operations():
    rng = np.random.default_rng(0)
    syn = WORLD.synonyms()
    words = "how do i hv0_1 the ho0_2".split()
    replaced = eda.synonym_replacement(words, 2, syn, rng)
    assert replaced[:3] == words[:3] and replaced[3] in syn["hv0_1"] and replaced[5] in syn["ho0_2"]
    assert len(eda.random_insertion(words, 2, syn, rng)) == len(words) + 2
    assert sorted(eda.random_swap(words, 3, rng)) == sorted(words)
    assert eda.random_deletion(words, 1.0, rng)[0] in words
    assert all(set(categories(WORLD.parse(eda.eda(" ".join(words), 0.1, syn, rng)).category)) <= {"c0"}
               for _ in range(20))


def _scores(teacher_unseen: float, kd_unseen: float, ha_unseen: float, teacher_f1: float = 0.9):
    tests = ("a", "b")
    row = lambda f1, unseen: {**{t: {"f1": f1, "auprc": f1} for t in tests}, "unseen": {"f1": unseen, "auprc": unseen}}
    return {"teacher": {"all": row(teacher_f1, teacher_unseen)},
            **{m: {s: row(f1 + 0.01 * s, u + 0.01 * s) for s in range(3)}
               for m, f1, u in (("kd_only", 0.6, kd_unseen), ("eda", 0.55, kd_unseen), ("harmaug", 0.85, ha_unseen))}}


def test_gates_make_the_student_claims_untestable():
    from types import SimpleNamespace

    from tasks.harmaug.claims import decide

    p = SimpleNamespace(kd_gap_min=0.1, teacher_f1_max=0.97, parser_min=0.999, beat_margin=0.0, gap_fraction=0.5,
                        cost_ratio=0.25, refusal_margin=0.5, wellformed_margin=0.5, unseen_margin=0.25)
    gen = {"refusal_no_prefix": [np.ones(50)] * 3, "wellformed_prefix": [np.ones(50)] * 3,
           "unseen_prefix": [np.r_[np.ones(30), np.zeros(20)]] * 3}
    cost = {"flops_ratio": 0.05, "latency_ratios": [0.1, 0.12, 0.11]}
    claims, gates = decide(_scores(0.9, 0.5, 0.8), gen, 1.0, cost, p)
    verdicts = {c.name: c.verdict for c in claims}
    assert all(g.passed for g in gates)
    assert verdicts == {"prefix_jailbreaks_generator": True, "harmaug_beats_kd_only": True,
                        "harmaug_beats_eda": True, "harmaug_closes_gap": True, "student_cheaper": True}
    claims, gates = decide(_scores(0.9, 0.85, 0.88), gen, 1.0, cost, p)   # D-only close to the teacher
    c = {x.name: x for x in claims}
    assert not gates[0].passed and c["harmaug_closes_gap"].verdict is None
    assert c["harmaug_beats_kd_only"].verdict is None and c["student_cheaper"].verdict is True
    claims, gates = decide(_scores(0.9, 0.5, 0.8, teacher_f1=0.99), gen, 1.0, cost, p)  # teacher at the ceiling
    assert not gates[1].passed and {x.name: x for x in claims}["harmaug_beats_eda"].verdict is None
    claims, gates = decide(_scores(0.9, 0.5, 0.8), {}, float("nan"), cost, p)        # no oracle: no generator claim
    assert {x.name: x for x in claims}["prefix_jailbreaks_generator"].verdict is None
