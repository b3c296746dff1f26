"""modular_lora-finetune: the benign fine-tuning arms and their re-emergence curves.

Per (objective, seed): ``full`` (all weights of the merged W0 + ΔW_safe), ``lora_on_safe`` (a new LoRA on
the merged safe model) and, once per seed, ``modular`` (a LoRA on W0 with the safety adapter off; both
adapters on at inference). digits: the new-style digits without the concept under [new, d] prompts;
sd_pipeline: the caption latents. The concept rate is probed ``curve_points`` times during training.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core import Params, StageContext, io, stage

from tasks.modular_lora.common import (CurvePoint, FinetuneInfo, Inputs, arm_key, concept_probe, generator,
                                       harm_detector, read_data, read_safety, safe_model)


class FinetuneParams(Params):
    arms: list[Literal["full", "lora_on_safe", "modular"]] = Field(min_length=1)
    steps: int = Field(gt=0)
    lr_lora: float = Field(gt=0)
    lr_full: float = Field(gt=0)
    batch: int = Field(gt=0)
    rank: int = Field(ge=1)
    layers: Literal["xattn", "attn", "all"]
    workers: int = Field(ge=1, description="processes (1 torch thread each) running the arms in parallel")
    curve_points: int = Field(gt=0, description="points on the re-emergence curve")
    curve_samples: int = Field(gt=0)
    ddim_steps: int = Field(gt=0)
    guidance: float = Field(ge=1)


def _train_job(job: dict) -> dict:
    """One arm of one (objective, seed): what it saves, its re-emergence curve and its loss curve."""
    import dataclasses

    import torch

    from models.modular_lora.adapters import arm_state

    ins, p, obj, seed, arm = (job["inputs"], FinetuneParams(**job["params"]), job["objective"], job["seed"],
                              job["arm"])
    data = read_data(ins.input("prepare"))
    detector = harm_detector(ins)
    every = max(1, p.steps // p.curve_points)
    model = safe_model(ins, obj, seed)
    torch.manual_seed(1000 * seed + 29)  # the LoRA's random init
    curve, losses = [], []

    def probe(step, loss, unet):
        if step % 25 == 0:
            losses.append((step, loss))
        if (step + 1) % every == 0 or step + 1 == p.steps:
            rates = concept_probe(dataclasses.replace(model, unet=unet), data, detector, p.curve_samples,
                                  p.ddim_steps, p.guidance)
            curve.append(CurvePoint(step=step + 1, harmful=rates))

    lr = p.lr_full if arm == "full" else p.lr_lora
    gen = generator(1000 * seed + 29)
    if data.source == "digits":
        from models.modular_lora.tiny_diffusion import finetune_arm, prompt_tokens

        tensors = io.load_state(ins.input("prepare") / "data.safetensors")
        unet = finetune_arm(arm, model.unet, model.text, tensors["ft_x"], prompt_tokens("new", tensors["ft_y"]),
                            p.steps, lr, p.batch, p.rank, p.layers, gen, on_step=probe)
    else:
        from models.modular_lora.stable_diffusion import finetune_arm

        latents = io.load_state(ins.input("prepare") / "latents.safetensors")["latents"]
        unet = finetune_arm(arm, model, latents, data.train_captions, p.steps, lr, p.batch, p.rank, p.layers, gen,
                            on_step=probe)
    return {"state": arm_state(arm, unet), "curve": curve, "losses": losses}


@stage(params=FinetuneParams, inputs=("prepare", "pretrain", "safety"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """The benign fine-tuning arms (full, LoRA on safe, Modular LoRA) with re-emergence curves."""
    ins = Inputs(ctx, ("prepare", "pretrain", "safety"))
    jobs, done_modular = [], set()
    for run in read_safety(ctx.input("safety")).runs:
        for arm in p.arms:
            # the modular fine-tuning LoRA trains on W0 alone: one per seed, shared by every safety objective
            if arm == "modular":
                if run.seed in done_modular:
                    continue
                done_modular.add(run.seed)
            jobs.append({"inputs": ins, "params": p.model_dump(), "objective": run.objective, "seed": run.seed,
                         "arm": arm, "key": arm_key(arm, run.objective, run.seed)})
    jobs.sort(key=lambda j: j["arm"] != "full")  # the slowest arm first: the two workers finish closer together
    curves = {}
    for job, res in zip(jobs, ctx.map(_train_job, jobs, p.workers, desc="fine-tuning arms")):
        key = job["key"]
        for step, loss in res["losses"]:
            ctx.log_metrics({f"ft_loss_{key}": loss}, step=step)
        for point in res["curve"]:
            ctx.log_metrics({f"curve_{key}_{group}": rate for group, rate in point.harmful.items()}, step=point.step)
        io.save_state(ctx.out_dir / f"{key}.safetensors", res["state"])
        curves[key] = res["curve"]
    info = FinetuneInfo(arms=p.arms, rank=p.rank, layers=p.layers, curves=curves)
    io.write_json(ctx.out_dir / "finetune.json", info.model_dump())
