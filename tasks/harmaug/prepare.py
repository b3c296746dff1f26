"""prepare: the seed set D (few categories), the test sets (all categories) and the corpora the world's
teacher, generator and response model learn from; or, at paper scale, local files."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError

from .common import categories, read_jsonl, write_jsonl


class WorldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_categories: int = Field(ge=2)
    verbs_per_category: int = Field(ge=2)
    objects_per_category: int = Field(ge=2)
    n_benign_verbs: int = Field(ge=2)
    n_benign_objects: int = Field(ge=2)


class TestSetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(gt=0)
    harmful_fraction: float = Field(gt=0, lt=1, description="share of harmful prompts")
    with_response: bool = Field(description="prompt+response rows (else prompt-only)")


class PrepareParams(Params):
    source: Literal["world", "local"] = Field(description="world (symbolic, CPU) or local files (paper)")
    seed_file: str = Field(description="local: jsonl of D in WildGuardMix's columns")
    test_dir: str = Field(description="local: folder of <test set>.jsonl (prompt, response, label[, category])")
    world: WorldParams
    seen_categories: list[int] = Field(min_length=1, description="the categories D covers")
    seed_benign_words: int = Field(gt=0, description="D uses the first k benign verbs and objects only")
    seed_size: int = Field(gt=0, description="rows of D")
    seed_harmful_fraction: float = Field(gt=0, lt=1)
    seed_response_fraction: float = Field(ge=0, le=1, description="rows of D with a response")
    teacher_size: int = Field(gt=0, description="rows (all categories) the world's teacher learns from")
    label_noise: float = Field(ge=0, lt=0.5, description="flipped labels in the teacher's data and D")
    test_label_noise: float = Field(ge=0, lt=0.5, description="flipped labels in the test sets")
    tests: dict[str, TestSetParams] = Field(min_length=1)
    generator_documents: int = Field(gt=0, description="'pretraining' lists of prompts (all categories)")
    alignment_chats: int = Field(gt=0, description="requests for a harmful prompt answered by a refusal")
    instruction_chats: int = Field(gt=0, description="requests for a benign prompt answered with the prefix")
    shots: int = Field(gt=0, description="exemplars per document / request")
    response_pairs: int = Field(gt=0, description="(instruction, compliant | refusal) pairs")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "local" and not (self.seed_file and self.test_dir):
            raise ValueError("source 'local' needs seed_file and test_dir")
        if any(c >= self.world.n_categories for c in self.seen_categories):
            raise ValueError("seen_categories must lie below world.n_categories")
        if self.seed_benign_words > min(self.world.n_benign_verbs, self.world.n_benign_objects):
            raise ValueError("seed_benign_words exceeds the world's benign verbs or objects")
        return self


def wildguard_rows(path: Path) -> list[dict]:
    """D from a WildGuardMix-style jsonl: prompt, response (may be empty), prompt_harm_label,
    response_harm_label ('harmful' / 'unharmful' / null; a missing response label counts as safe, as in
    the paper's loader), subcategory."""
    rows = []
    for r in read_jsonl(path):
        response = r.get("response") or ""
        harm = r.get("response_harm_label") if response else r.get("prompt_harm_label")
        rows.append({"prompt": r["prompt"], "response": response, "label": int(harm == "harmful"),
                     "kind": "", "category": r.get("subcategory") or ""})
    return rows


def local_tests(folder: Path) -> dict[str, list[dict]]:
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingInputError(f"'harmaug.prepare.test_dir' ({folder}) holds no <name>.jsonl test sets")
    return {f.stem: [{"prompt": r["prompt"], "response": r.get("response") or "", "label": int(r["label"]),
                      "kind": "", "category": r.get("category") or ""} for r in read_jsonl(f)] for f in files}


def chats(world, tok, rng: np.random.Generator, p: PrepareParams) -> list[str]:
    """Instruction tuning and safety alignment through the tokenizer's chat template: a request for a
    benign prompt (benign exemplars) is answered with the prefix and a new benign prompt (words not among
    the examples'); the request for
    a harmful prompt (exemplars from the seen categories, as in D) is answered by a refusal."""
    from models.harmaug.lm import chat_prompt
    from models.harmaug.world import BENIGN_REQUEST, PREFIX, REFUSALS, request_text

    every = list(range(p.world.n_categories))
    examples = lambda kind, cats: [world.prompt(rng, kind, cats).prompt for _ in range(p.shots)]
    out = [f"{chat_prompt(tok, request_text(examples('harmful', p.seen_categories)))} "
           f"{REFUSALS[rng.integers(len(REFUSALS))]}" for _ in range(p.alignment_chats)]
    for _ in range(p.instruction_chats):
        shown = examples("benign", every)
        out.append(f"{chat_prompt(tok, request_text(shown, BENIGN_REQUEST), PREFIX)} "
                   f"{new_prompt(world, rng, 'benign', every, shown)}")
    return out


def new_prompt(world, rng: np.random.Generator, kind: str, cats: list[int], shown: list[str], tries: int = 50) -> str:
    """A prompt none of whose verb and object appears among the ``shown`` ones (a new example)."""
    used = {w for x in shown for w in x.split()}
    for _ in range(tries):
        parsed = world.parse(text := world.prompt(rng, kind, cats).prompt)
        if parsed.verb not in used and parsed.obj not in used:
            return text
    return text


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """D (seen categories only), four test sets (all categories) and the world's training corpora."""
    from models.harmaug.lm import chat_prompt, word_tokenizer
    from models.harmaug.world import HarmWorld

    out = ctx.out_dir
    if p.source == "local":
        seed_rows, tests = wildguard_rows(Path(p.seed_file)), local_tests(Path(p.test_dir))
        seen = sorted({c for r in seed_rows for c in categories(r["category"])})
    else:
        world = HarmWorld(**p.world.model_dump())
        rng = np.random.default_rng(ctx.seed)
        seen = [f"c{c}" for c in p.seen_categories]
        n_resp = int(round(p.seed_size * p.seed_response_fraction))
        seed_rows = [r.to_dict() for part, n in ((False, p.seed_size - n_resp), (True, n_resp))
                     for r in world.dataset(rng, n, p.seen_categories, p.seed_harmful_fraction, part, p.label_noise,
                                            p.seed_benign_words)]
        every = list(range(p.world.n_categories))
        tests = {name: [r.to_dict() for r in world.dataset(rng, t.n, every, t.harmful_fraction, t.with_response,
                                                          p.test_label_noise)] for name, t in p.tests.items()}
        half = p.teacher_size // 2
        teacher = [r.to_dict() for part, n in ((False, half), (True, p.teacher_size - half))
                   for r in world.dataset(rng, n, every, 0.4, part, p.label_noise)]
        write_jsonl(out / "teacher_train.jsonl", teacher)
        tok = word_tokenizer(world.vocabulary())
        tok.save_pretrained(str(out / "tokenizer"))
        docs = world.generator_documents(rng, p.generator_documents, p.shots)
        docs += chats(world, tok, rng, p)
        io.write_json(out / "generator_corpus.json", [docs[i] for i in rng.permutation(len(docs))])
        pairs = world.response_pairs(rng, p.response_pairs)
        io.write_json(out / "response_corpus.json", [f"{chat_prompt(tok, x)} {y}" for x, y in pairs])
    write_jsonl(out / "seed.jsonl", seed_rows)
    for name, rows in tests.items():
        write_jsonl(out / "tests" / f"{name}.jsonl", rows)
    stats = {"seed_rows": len(seed_rows), "seed_unsafe": float(np.mean([r["label"] for r in seed_rows])),
             **{f"{k}_unsafe": float(np.mean([r["label"] for r in v])) for k, v in tests.items()}}
    ctx.log_metrics(stats)
    io.write_json(out / "meta.json", {"source": p.source, "world": p.world.model_dump(),
                                      "seen_categories": seen, "tests": sorted(tests), "stats": stats})
