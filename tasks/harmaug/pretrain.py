"""pretrain: the world's teacher guard, safety-aligned generator and response model, trained from scratch
in parallel; at paper scale, the local models' paths (nothing is trained)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core import Params, StageContext, io, stage

from .common import check_model_dir, columns, read_jsonl


class LMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_positions: int = Field(ge=64, description="few-shot context + prefix + continuation")
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup: int = Field(ge=0)


class TeacherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: Literal["bert", "deberta_v2"]
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    max_length: int = Field(gt=8)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup: int = Field(ge=0)


class PretrainParams(Params):
    source: Literal["train", "local"] = Field(description="train the world's models, or local paths (paper)")
    generator_path: str = Field(description="local: safety-aligned chat LM folder (save_pretrained)")
    responder_path: str = Field(description="local: response LM folder")
    teacher_path: str = Field(description="local: teacher guard folder")
    teacher_kind: Literal["classifier", "causal_lm"]
    safe_token: str = Field(description="causal_lm teacher: the first-token verdicts")
    unsafe_token: str
    teacher_suffix: str = Field(description="causal_lm teacher: appended to its chat template")
    teacher: TeacherParams
    generator: LMParams
    responder: LMParams
    workers: int = Field(gt=0, description="processes training the three models (one per core)")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "local" and not (self.generator_path and self.responder_path and self.teacher_path):
            raise ValueError("source 'local' needs generator_path, responder_path and teacher_path")
        if self.source == "train" and self.teacher_kind != "classifier":
            raise ValueError("the world's teacher is a classifier (teacher_kind: classifier)")
        return self


@dataclass(frozen=True)
class TrainJob:
    model: str            # teacher | generator | responder
    prepare_dir: str
    out_dir: str
    params: dict
    seed: int


def train_model(job: TrainJob) -> dict:
    """Train one of the world's models and save it (with the world tokenizer) to ``out_dir/model``."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from models.harmaug.guard import KDConfig, classifier_from_config, train_guard
    from models.harmaug.lm import LMTrainConfig, tiny_gpt2, train_lm

    p = PretrainParams.model_validate(job.params)
    prep = Path(job.prepare_dir)
    tok = AutoTokenizer.from_pretrained(str(prep / "tokenizer"))
    torch.manual_seed(job.seed)
    gen = torch.Generator().manual_seed(job.seed)
    if job.model == "teacher":
        t = p.teacher
        rows = read_jsonl(prep / "teacher_train.jsonl")
        prompts, responses, labels = columns(rows, "prompt", "response", "label")
        model = classifier_from_config(t.arch, len(tok), t.hidden, t.layers, t.heads, t.intermediate,
                                       t.max_length, tok.pad_token_id)
        curve = train_guard(model, tok, prompts, responses, np.asarray(labels, dtype=np.float32),
                            KDConfig(t.steps, t.batch_size, t.lr, t.weight_decay, t.warmup, t.max_length),
                            gen, "cpu")
    else:
        lp: LMParams = getattr(p, job.model)
        corpus = "generator_corpus.json" if job.model == "generator" else "response_corpus.json"
        model = tiny_gpt2(len(tok), lp.n_layer, lp.n_embd, lp.n_head, lp.n_positions, tok)
        curve = train_lm(model, tok, io.read_json(prep / corpus),
                         LMTrainConfig(lp.steps, lp.batch_size, lp.lr, lp.warmup), gen, "cpu")
    folder = Path(job.out_dir) / job.model
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return {"model": job.model, "curve": curve, "params": sum(x.numel() for x in model.parameters())}


@stage(params=PretrainParams, inputs=("prepare",))
def pretrain(ctx: StageContext, p: PretrainParams) -> None:
    """Teacher guard (all categories), safety-aligned generator, response model; or local paths."""
    teacher = {"kind": p.teacher_kind, "max_length": p.teacher.max_length, "safe_token": p.safe_token,
               "unsafe_token": p.unsafe_token, "suffix": p.teacher_suffix}
    if p.source == "local":
        paths = {"generator": p.generator_path, "responder": p.responder_path, "teacher": p.teacher_path}
        for name, path in paths.items():
            check_model_dir(Path(path), f"harmaug.pretrain.{name}_path")
        models = {n: {"path": str(Path(v).resolve())} for n, v in paths.items() if n != "teacher"}
        io.write_json(ctx.out_dir / "models.json", {**models, "teacher": {**teacher, "path": str(
            Path(p.teacher_path).resolve())}})
        return
    jobs = [TrainJob(name, str(ctx.input("prepare")), str(ctx.out_dir), p.model_dump(), ctx.seed + i)
            for i, name in enumerate(("generator", "teacher", "responder"))]

    def log(i, result):
        for step, loss in enumerate(result["curve"][::10]):
            ctx.log_metrics({f"loss_{result['model']}": loss}, step=10 * step)

    results = ctx.map(train_model, jobs, workers=p.workers, desc="models", on_result=log)
    io.write_json(ctx.out_dir / "curves.json", {r["model"]: r["curve"] for r in results})
    io.write_json(ctx.out_dir / "models.json", {
        "generator": {"path": "generator"}, "responder": {"path": "responder"},
        "teacher": {**teacher, "path": "teacher"},
        "parameters": {r["model"]: r["params"] for r in results}})
