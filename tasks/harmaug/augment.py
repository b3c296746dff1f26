"""augment: HarmAug sampling (few-shot request, assistant turn prefilled with the affirmative prefix), the
no-prefix control, a compliant and a refusal response per instruction, EDA of D, teacher soft labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from .common import AUGMENTED, columns, load_causal_lm, load_teacher, load_world, model_path, read_jsonl, write_jsonl


class AugmentParams(Params):
    seeds: list[int] = Field(min_length=1, description="one sampled D̂ (and EDA set) per student seed")
    n_instructions: int = Field(gt=0, description="synthetic instructions per seed (3 rows each)")
    shots: int = Field(gt=0, description="few-shot exemplars from D in the request")
    request: str = Field(min_length=1, description="the generation request (notes §6.2)")
    prefix: str = Field(min_length=1, description="the affirmative prefix prefilled in the assistant turn")
    response_openers: list[str] = Field(min_length=2, max_length=2,
                                        description="prefills for the compliant and the refusal response")
    max_new_tokens: int = Field(gt=0)
    response_max_new_tokens: int = Field(gt=0)
    temperature: float = Field(gt=0)
    batch_size: int = Field(gt=0, description="sampling batch (padding trimmed per batch)")
    label_batch_size: int = Field(gt=0)
    eda_alpha: float = Field(gt=0, le=0.5, description="EDA's share of words changed")
    workers: int = Field(gt=0, description="processes sampling seeds in parallel")


@dataclass(frozen=True)
class SeedJob:
    seed: int
    prepare_dir: str
    pretrain_dir: str
    params: dict
    cuda: bool


def requests(rng: np.random.Generator, exemplars: list[str], n: int, shots: int, request: str) -> list[str]:
    """``n`` requests, each with ``shots`` distinct harmful prompts of D as examples."""
    picks = [rng.choice(len(exemplars), size=min(shots, len(exemplars)), replace=False) for _ in range(n)]
    return [f"{request} . examples : " + " ; ".join(exemplars[i] for i in idx) for idx in picks]


def respond(model, tok, instructions: list[str], openers: list[str], p: AugmentParams, seed: int,
            device) -> list[dict]:
    """Three rows per instruction: prompt-only, with a compliant and with a refusing response (the
    response model's assistant turn prefilled with each opener)."""
    from models.harmaug.lm import chat_prompt, sample

    rows = [{"prompt": x, "response": ""} for x in instructions]
    for k, opener in enumerate(openers):
        chats = [f"{chat_prompt(tok, x)} {opener}" for x in instructions]
        tails = sample(model, tok, chats, p.response_max_new_tokens, p.batch_size, seed + 101 * (k + 1), device,
                       p.temperature)
        rows += [{"prompt": x, "response": f"{opener} {t}".strip()} for x, t in zip(instructions, tails)]
    return rows


def augment_seed(job: SeedJob) -> dict:
    """One seed: sample instructions with and without the prefix, respond, EDA, label with the teacher."""
    import torch

    from models.harmaug.eda import eda
    from models.harmaug.lm import chat_prompt, sample

    p = AugmentParams.model_validate(job.params)
    prep, pre = Path(job.prepare_dir), Path(job.pretrain_dir)
    device = torch.device("cuda" if job.cuda else "cpu")
    rng = np.random.default_rng(job.seed)
    seed_rows = read_jsonl(prep / "seed.jsonl")
    exemplars = sorted({r["prompt"] for r in seed_rows if r["label"] == 1})
    gen_model, gen_tok = load_causal_lm(model_path(pre, "generator"), device)
    asks = requests(rng, exemplars, p.n_instructions, p.shots, p.request)
    texts = {}
    for name, prefix in (("harmaug", p.prefix), ("no_prefix", "")):
        chats = [chat_prompt(gen_tok, a, prefix) for a in asks]
        texts[name] = sample(gen_model, gen_tok, chats, p.max_new_tokens, p.batch_size,
                             job.seed * 7919 + len(prefix), device, p.temperature)
    resp_model, resp_tok = load_causal_lm(model_path(pre, "responder"), device)
    data = {name: respond(resp_model, resp_tok, texts[name], p.response_openers, p, job.seed, device)
            for name in ("harmaug", "no_prefix")}
    world = load_world(prep)
    synonyms = world.synonyms() if world is not None else {}
    picks = rng.integers(len(seed_rows), size=len(data["harmaug"]))
    data["eda"] = [{"prompt": eda(seed_rows[i]["prompt"], p.eda_alpha, synonyms, rng),
                    "response": seed_rows[i]["response"]} for i in picks]
    teacher = load_teacher(pre, device)
    for rows in data.values():
        prompts, responses = columns(rows, "prompt", "response")
        for r, s in zip(rows, teacher.prob_unsafe(prompts, responses, p.label_batch_size)):
            r["soft"] = float(s)
    parsed = {}
    for name, outs in texts.items():
        parsed[name] = [{"text": t, **(world.parse(t).__dict__ if world is not None else {})} for t in outs]
    return {"seed": job.seed, "data": data, "instructions": parsed}


@stage(params=AugmentParams, inputs=("prepare", "pretrain"), gpu=True)
def augment(ctx: StageContext, p: AugmentParams) -> None:
    """D labelled by the teacher; per seed: D̂ with the prefix, D̂ without it, EDA(D), all teacher-labelled."""
    prep, pre = ctx.input("prepare"), ctx.input("pretrain")
    teacher = load_teacher(pre, ctx.device)
    seed_rows = read_jsonl(prep / "seed.jsonl")
    prompts, responses = columns(seed_rows, "prompt", "response")
    for r, s in zip(seed_rows, teacher.prob_unsafe(prompts, responses, p.label_batch_size)):
        r["soft"] = float(s)
    write_jsonl(ctx.out_dir / "seed.jsonl", seed_rows)
    jobs = [SeedJob(seed, str(prep), str(pre), p.model_dump(), ctx.device.type == "cuda") for seed in p.seeds]

    def log(i, result):
        for name, rows in result["data"].items():
            ctx.log_metrics({f"unsafe_share_{name}_seed{result['seed']}": float(np.mean([r["soft"] > 0.5
                                                                                       for r in rows]))})

    workers = 1 if ctx.device.type == "cuda" else p.workers
    for result in ctx.map(augment_seed, jobs, workers=workers, desc="seeds", on_result=log):
        folder = ctx.out_dir / f"seed{result['seed']}"
        for name, rows in result["data"].items():
            write_jsonl(folder / AUGMENTED[name], rows)
        io.write_json(folder / "instructions.json", result["instructions"])
    io.write_json(ctx.out_dir / "meta.json", {"seeds": p.seeds, "n_instructions": p.n_instructions})
