"""modular_lora-safety: a safety LoRA ΔW_safe per objective (ESD, SDD) and seed, on the frozen W0.

Both scales draw x_t as the authors' ESD/SDD code does (:mod:`models.modular_lora.erasure`): partial DDIM +
CFG sampling with the concept prompt from the student (ESD) or the EMA teacher (SDD). The preservation term
(not in either paper) is off at weight 0, the primary setting.
Only the LoRA matrices are saved (peft's adapter state dict).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from tasks.modular_lora.common import Inputs, Run, SafetyInfo, generator, load_w0, read_data

OBJECTIVES = ("esd", "sdd")


class SafetyParams(Params):
    objectives: list[Literal["esd", "sdd"]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch: int = Field(gt=0)
    rank: int = Field(ge=1, description="LoRA rank (>= 1)")
    layers: Literal["xattn", "attn", "all"]
    esd_scale: float = Field(gt=0, description="ESD negative-guidance scale s")
    preserve_weight: float = Field(ge=0, description="weight of the preservation term on other prompts")
    preserve_styles: list[Literal["plain", "new"]] = Field(
        min_length=1, description="digits: the styles of the other digits' prompts the preservation term keeps")
    sdd_ema_decay: float = Field(gt=0, lt=1)
    workers: int = Field(ge=1, description="processes (1 torch thread each) running the runs in parallel")
    ddim_steps: int = Field(gt=0, description="DDIM steps of ESD/SDD's partial sampling of x_t")
    guidance: float = Field(ge=1, description="CFG scale of that sampling")


def _train_job(job: dict) -> dict:
    """One (objective, seed): the trained safety adapter's state and its loss curve."""
    import torch

    from models.modular_lora.adapters import SAFETY, adapter_state

    ins, p, obj, seed = job["inputs"], SafetyParams(**job["params"]), job["objective"], job["seed"]
    data = read_data(ins.input("prepare"))
    model = load_w0(ins)
    torch.manual_seed(1000 * seed + 17 + OBJECTIVES.index(obj))  # the LoRA's random init
    losses = []

    def log(step, loss):
        if step % 25 == 0:
            losses.append((step, loss))

    gen = generator(1000 * seed + 17)
    if data.source == "digits":
        from models.modular_lora.tiny_diffusion import prompt_tokens, train_safety_lora

        others = [d for d in range(10) if d != data.concept]  # the preservation prompts (weight 0: unused)
        keep_tok = torch.cat([prompt_tokens(style, others) for style in p.preserve_styles])
        train_safety_lora(model, prompt_tokens("plain", [data.concept]), keep_tok, obj, p.steps, p.lr, p.batch,
                          p.rank, p.layers, gen, ddim_steps=p.ddim_steps, guidance=p.guidance,
                          esd_scale=p.esd_scale, preserve_weight=p.preserve_weight, ema_decay=p.sdd_ema_decay,
                          on_step=log)
    else:
        from models.modular_lora.stable_diffusion import train_safety_lora

        train_safety_lora(model, data.concept_prompt, obj, p.steps, p.lr, p.rank, p.layers, gen,
                          ddim_steps=p.ddim_steps, guidance=p.guidance, esd_scale=p.esd_scale,
                          ema_decay=p.sdd_ema_decay, batch=p.batch, keep_prompts=data.prompts["benign"],
                          preserve_weight=p.preserve_weight, on_step=log)
    return {"state": adapter_state(model.unet, SAFETY), "losses": losses}


@stage(params=SafetyParams, inputs=("prepare", "pretrain"), gpu=True)
def safety(ctx: StageContext, p: SafetyParams) -> None:
    """A safety LoRA per objective (ESD, SDD) and seed on the frozen W0."""
    ins = Inputs(ctx, ("prepare", "pretrain"))
    runs = [Run(objective=obj, seed=seed) for obj in p.objectives for seed in p.seeds]
    jobs = [{"inputs": ins, "params": p.model_dump(), **r.model_dump()} for r in runs]
    for r, res in zip(runs, ctx.map(_train_job, jobs, p.workers, desc="safety LoRAs")):
        for step, loss in res["losses"]:
            ctx.log_metrics({f"safety_loss_{r.objective}_s{r.seed}": loss}, step=step)
        io.save_state(ctx.out_dir / f"safety_{r.objective}_s{r.seed}.safetensors", res["state"])
    io.write_json(ctx.out_dir / "safety.json",
                  SafetyInfo(runs=runs, rank=p.rank, layers=p.layers).model_dump())
