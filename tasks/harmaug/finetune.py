"""finetune: distil the teacher into the small student on D alone, D + EDA(D), D + D̂ without the prefix
and D + D̂ (HarmAug), with the paper's loss, class-balanced sampling and the same steps for every variant."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core import Params, StageContext, io, stage

from .common import AUGMENTED, columns, read_jsonl, soft_labels


class StudentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["config", "local"] = Field(description="config: built from scratch; local: path (paper)")
    path: str = Field(description="local: a sequence-classification checkpoint folder (e.g. DeBERTa-v3)")
    arch: Literal["bert", "deberta_v2"]
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    max_length: int = Field(gt=8)


class FinetuneParams(Params):
    variants: list[Literal["kd_only", "eda", "no_prefix", "harmaug"]] = Field(min_length=1)
    student: StudentParams
    steps: int = Field(gt=0, description="the same for every variant")
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup: int = Field(ge=0)
    workers: int = Field(gt=0, description="processes training students in parallel")

    @model_validator(mode="after")
    def _check(self):
        if self.student.source == "local" and not self.student.path:
            raise ValueError("student.source 'local' needs student.path")
        return self


@dataclass(frozen=True)
class StudentJob:
    variant: str
    seed: int
    prepare_dir: str
    augment_dir: str
    out_dir: str
    params: dict
    cuda: bool


def training_rows(augment_dir: Path, variant: str, seed: int) -> list[dict]:
    """D, plus the variant's augmented rows of ``seed``."""
    rows = read_jsonl(augment_dir / "seed.jsonl")
    if variant != "kd_only":
        rows = rows + read_jsonl(augment_dir / f"seed{seed}" / AUGMENTED[variant])
    return rows


def build_student(s: StudentParams, prepare_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.harmaug.guard import classifier_from_config

    if s.source == "local":
        return (AutoModelForSequenceClassification.from_pretrained(s.path, num_labels=2),
                AutoTokenizer.from_pretrained(s.path))
    tok = AutoTokenizer.from_pretrained(str(prepare_dir / "tokenizer"))
    return (classifier_from_config(s.arch, len(tok), s.hidden, s.layers, s.heads, s.intermediate, s.max_length,
                                   tok.pad_token_id), tok)


def train_student(job: StudentJob) -> dict:
    import torch

    from models.harmaug.guard import KDConfig, train_guard

    p = FinetuneParams.model_validate(job.params)
    device = torch.device("cuda" if job.cuda else "cpu")
    torch.manual_seed(job.seed)
    model, tok = build_student(p.student, Path(job.prepare_dir))
    rows = training_rows(Path(job.augment_dir), job.variant, job.seed)
    prompts, responses = columns(rows, "prompt", "response")
    cfg = KDConfig(p.steps, p.batch_size, p.lr, p.weight_decay, p.warmup, p.student.max_length)
    curve = train_guard(model, tok, prompts, responses, soft_labels(rows), cfg,
                        torch.Generator().manual_seed(job.seed), device)
    folder = Path(job.out_dir) / f"{job.variant}_seed{job.seed}"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return {"variant": job.variant, "seed": job.seed, "curve": curve, "rows": len(rows),
            "params": sum(x.numel() for x in model.parameters())}


@stage(params=FinetuneParams, inputs=("prepare", "augment"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """One student per variant and seed; every variant takes the same number of steps."""
    seeds = io.read_json(ctx.input("augment") / "meta.json")["seeds"]
    jobs = [StudentJob(v, s, str(ctx.input("prepare")), str(ctx.input("augment")), str(ctx.out_dir),
                       p.model_dump(), ctx.device.type == "cuda") for s in seeds for v in p.variants]

    def log(i, r):
        ctx.log_metrics({f"final_loss_{r['variant']}_seed{r['seed']}": sum(r["curve"][-20:]) / 20})

    workers = 1 if ctx.device.type == "cuda" else p.workers
    results = ctx.map(train_student, jobs, workers=workers, desc="students", on_result=log)
    io.write_json(ctx.out_dir / "meta.json", {
        "seeds": seeds, "variants": p.variants, "steps": p.steps,
        "rows": {f"{r['variant']}_seed{r['seed']}": r["rows"] for r in results},
        "student_parameters": results[0]["params"]})
    io.write_json(ctx.out_dir / "curves.json", {f"{r['variant']}_seed{r['seed']}": r["curve"][::5] for r in results})
