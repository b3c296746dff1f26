"""Stages of modular_lora: safety alignment backfires under benign fine-tuning; Modular LoRA prevents it.

prepare  -> digits (base style + the benign new-style set without the concept), detector trained on real digits
pretrain -> W0 and the frozen text encoder (shared by every seed), with a quality gate on per-class accuracy
safety   -> a safety LoRA per objective (ESD, SDD) and seed
finetune -> the benign fine-tuning arms (full, lora_on_safe, modular) + the re-emergence curves
evaluate -> per-prompt class histograms, harmful rates, FD-proxy, accuracy, model arithmetic, claims, plots
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core import Params, StageContext, stage

PAPER = "modular_lora"
np = torch = F = ml = load_file = save_file = None  # heavy imports, bound by _imports() inside each stage


def _imports() -> None:
    """Import torch/diffusers/peft only when a stage of this paper runs (the CLI loads every paper)."""
    global np, torch, F, ml, load_file, save_file
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from models import modular_lora as ml


# ----------------------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------------------
class PrepareParams(Params):
    image_size: Literal[8, 16] = Field(8, description="side of the digit images (sklearn digits are 8x8)")
    concept: int = Field(7, description="the suppressed ('harmful') digit class")
    new_style: Literal["invert", "thick", "flip"] = Field("thick", description="look of the benign domain")
    finetune_digits: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 8, 9],
                                       description="digits of the benign fine-tuning set (never the concept)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    detector_steps: int = Field(400, gt=0)
    detector_noise: float = Field(0.3, ge=0)
    # paper scale (source: sd_pipeline, tasks/modular_lora_sd.py); the digits keys above are then unused
    source: Literal["digits", "sd_pipeline"] = Field("digits", description="digits (CPU scale) or a local SD pipeline")
    model_dir: str = Field("", description="sd_pipeline: a StableDiffusionPipeline.save_pretrained folder")
    finetune_folder: str = Field("", description="sd_pipeline: image-caption folder (metadata.jsonl or images/*.png+.txt)")
    eval_prompts: str = Field("", description="sd_pipeline: prompts file (.json or 'concept:/benign:/task:' lines)")
    concept_prompt: str = Field("", description="sd_pipeline: the suppressed concept as a text prompt")
    detector: str = Field("", description="sd_pipeline: image-classifier folder or 'module:factory' plug-in")
    detector_label: int | str = Field("", description="sd_pipeline: the detector's concept label (name or index)")
    detector_threshold: float = Field(0.5, ge=0, le=1, description="sd_pipeline: P(concept) that flags an image")
    feature_model: str = Field("", description="sd_pipeline: image-classifier folder for FD (default: detector)")
    resolution: int = Field(512, gt=0, description="sd_pipeline: image side (pixels)")

    @field_validator("concept")
    @classmethod
    def _concept_is_a_digit(cls, v: int) -> int:
        if not 0 <= v <= 9:
            raise ValueError(f"unknown concept {v}: the concept must be a digit class 0..9")
        return v

    @model_validator(mode="after")
    def _benign_set(self):
        if not self.finetune_digits:
            raise ValueError("finetune_digits is empty: the benign fine-tuning set needs at least one digit")
        if self.concept in self.finetune_digits:
            raise ValueError(f"finetune_digits contains the concept {self.concept}: the benign set must not")
        if any(not 0 <= d <= 9 for d in self.finetune_digits):
            raise ValueError("finetune_digits must be digits 0..9")
        if self.source == "sd_pipeline":
            for key in ("model_dir", "finetune_folder", "eval_prompts", "concept_prompt", "detector"):
                if not getattr(self, key).strip():
                    raise ValueError(f"source 'sd_pipeline' needs '{key}'")
        return self


class PretrainParams(Params):
    steps: int = Field(1500, gt=0)
    lr: float = Field(2e-3, gt=0)
    batch: int = Field(64, gt=0)
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=2, max_length=2)
    text_dim: int = Field(16, gt=0, description="width of the text encoder = UNet cross-attention dim")
    null_prob: float = Field(0.1, ge=0, lt=1, description="prompt dropout to NULL for guidance")
    ema_decay: float = Field(0.995, gt=0, lt=1)
    gate_samples: int = Field(40, gt=0, description="samples per digit for the quality gate")
    gate_min_accuracy: float = Field(0.8, ge=0, le=1, description="every class's detector accuracy must pass")
    ddim_steps: int = Field(20, gt=0)
    guidance: float = Field(3.0, ge=1, description="classifier-free guidance scale (>= 1)")


class SafetyParams(Params):
    objectives: list[Literal["esd", "sdd"]] = Field(default_factory=lambda: ["esd", "sdd"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    steps: int = Field(200, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch: int = Field(32, gt=0)
    rank: int = Field(4, ge=1, description="LoRA rank (>= 1)")
    layers: Literal["xattn", "attn", "all"] = Field("attn")
    esd_scale: float = Field(3.0, gt=0, description="ESD negative-guidance scale s")
    preserve_weight: float = Field(1.0, ge=0, description="weight of the preservation term on other prompts")
    preserve_styles: list[Literal["plain", "new"]] = Field(
        default_factory=lambda: ["plain"], min_length=1,
        description="digits: the styles of the other digits' prompts the preservation term keeps (plain, new)")
    sdd_ema_decay: float = Field(0.99, gt=0, lt=1)
    workers: int = Field(1, ge=1, description="processes (1 torch thread each) running the runs in parallel")
    ddim_steps: int = Field(50, gt=0, description="sd_pipeline: DDIM steps of ESD/SDD's partial sampling of x_t")
    guidance: float = Field(3.0, ge=1, description="sd_pipeline: CFG scale of that sampling")


class FinetuneParams(Params):
    arms: list[Literal["full", "lora_on_safe", "modular"]] = Field(
        default_factory=lambda: ["full", "lora_on_safe", "modular"], min_length=1)
    steps: int = Field(200, gt=0)
    lr_lora: float = Field(1e-3, gt=0)
    lr_full: float = Field(1e-4, gt=0)
    batch: int = Field(32, gt=0)
    rank: int = Field(4, ge=1)
    layers: Literal["xattn", "attn", "all"] = Field("attn")
    workers: int = Field(1, ge=1, description="processes (1 torch thread each) running the arms in parallel")
    curve_points: int = Field(4, gt=0, description="points on the re-emergence curve")
    curve_samples: int = Field(32, gt=0)
    ddim_steps: int = Field(20, gt=0)
    guidance: float = Field(3.0, ge=1)


class EvaluateParams(Params):
    samples_per_prompt: int = Field(32, gt=1)
    concept_samples: int = Field(32, gt=0, description="digits: samples of each concept prompt for the harmful rate")
    ddim_steps: int = Field(20, gt=0)
    guidance: float = Field(3.0, ge=1)
    safety_ratio: float = Field(0.5, gt=0, le=1, description="safe rate <= ratio x base rate")
    accuracy_tolerance: float = Field(0.10, ge=0, description="other digits' accuracy drop allowed (absolute)")
    backfire_margin: float = Field(0.10, ge=0, description="rise of the harmful rate that counts as backfire")
    collapse_margin: float = Field(0.10, ge=0, description="other prompts' share of the concept vs base")
    modular_margin: float = Field(0.05, ge=0, description="Modular LoRA's allowed rise over the safe model")
    task_tolerance: float = Field(0.10, ge=0, description="relative tolerance on FD-proxy and accuracy")
    workers: int = Field(1, ge=1, description="processes (1 torch thread each) sampling the runs in parallel")
    task_samples_per_prompt: int = Field(1, gt=0, description="sd_pipeline: images per task prompt (FD)")


# ----------------------------------------------------------------------------------------------------------
# file helpers (stage-local)
# ----------------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _read_json(path: Path):
    return json.loads(path.read_text())


def _load_digits(size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def _source(ctx: StageContext) -> str:
    """What prepare built: 'digits' (CPU scale) or 'sd_pipeline' (paper scale)."""
    return _read_json(ctx.input("prepare") / "data.json").get("source", "digits")


def _summarize(base_m: dict, per_run: dict) -> dict:
    """{objective: {model: {metric: mean, std, per_seed}}} from the base model's metrics and
    per_run[objective][model][seed] = metrics (the base model, shared by every run, gets std 0)."""
    summary = {}
    for obj, arms in per_run.items():
        summary[obj] = {"base": {k: {"mean": v, "std": 0.0} for k, v in base_m.items()}}
        for name, by_seed in arms.items():
            keys = next(iter(by_seed.values())).keys()
            summary[obj][name] = {k: {"mean": float(np.mean([r[k] for r in by_seed.values()])),
                                      "std": float(np.std([r[k] for r in by_seed.values()])),
                                      "per_seed": [round(r[k], 4) for r in by_seed.values()]} for k in keys}
    return summary


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _load_detector(folder: Path) -> ml.DigitDetector:
    meta = _read_json(folder / "data.json")
    det = ml.DigitDetector(pixels=meta["image_size"] ** 2)
    det.load_state_dict(load_file(folder / "detector.safetensors"))
    det.eval()
    return det


def _load_base(folder: Path) -> tuple[ml.Denoiser, dict]:
    meta = _read_json(folder / "base.json")
    unet = ml.build_unet(sample_size=meta["image_size"], channels=meta["channels"], cross_dim=meta["text_dim"])
    unet.load_state_dict(load_file(folder / "unet.safetensors"))
    text = ml.TinyTextEncoder(dim=meta["text_dim"])
    text.load_state_dict(load_file(folder / "text.safetensors"))
    for p in list(unet.parameters()) + list(text.parameters()):
        p.requires_grad_(False)
    unet.eval()
    return ml.Denoiser(unet, text), meta


def _adapter_state(unet, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in unet.named_parameters() if f".{name}." in n}


def _load_adapter(unet, name: str, rank: int, layers: str, state: dict[str, torch.Tensor]) -> None:
    unet.add_adapter(ml.lora_config(rank, layers=layers), adapter_name=name)
    missing = set(state) - {n for n, _ in unet.named_parameters()}
    if missing:
        raise ValueError(f"adapter {name!r} does not fit the UNet: {sorted(missing)[:3]}")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    for p in unet.parameters():
        p.requires_grad_(False)


def _prompts_hist(den: ml.Denoiser, det: ml.DigitDetector, style: str, n: int, steps: int, guidance: float,
                  seed: int, digits=range(10), extra: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, torch.Tensor]:
    """Class histogram (len(digits), 10) of what each [style, d] prompt generates, and the samples (n per digit).

    ``extra`` = (digit, m): m further samples of that digit's prompt, drawn in the same batch, give its row
    instead (evaluate's larger sample of the concept prompt for the harmful rate); they are not returned.
    """
    digits = list(digits)
    d = torch.tensor(digits).repeat_interleave(n)
    if extra:
        d = torch.cat([d, torch.full((extra[1],), extra[0])])
    imgs = ml.sample(den, ml.prompt_tokens(style, d), steps=steps, guidance=guidance, gen=_generator(seed))
    pred = det.predict(imgs)
    k = len(digits) * n
    hist = np.stack([ml.class_histogram(row) for row in pred[:k].reshape(len(digits), n)])
    if extra:
        hist[digits.index(extra[0])] = ml.class_histogram(pred[k:])
    return hist, imgs[:k]


class _Inputs:
    """The input folders of a stage, picklable (what worker processes get instead of the StageContext)."""

    def __init__(self, ctx: StageContext, names: tuple[str, ...]):
        self.folders = {n: ctx.input(n) for n in names}

    def input(self, name: str) -> Path:
        return self.folders[name]


def _safety_job(job: dict) -> dict:
    _imports()
    ins, p, obj, seed = job["inputs"], SafetyParams(**job["params"]), job["objective"], job["seed"]
    data = load_file(ins.input("prepare") / "data.safetensors")
    c = _read_json(ins.input("prepare") / "data.json")["concept"]
    x, y = data["train_x"], data["train_y"]
    den, _ = _load_base(ins.input("pretrain"))
    torch.manual_seed(1000 * seed + 17 + ("esd", "sdd").index(obj))  # the LoRA's random init
    losses = []

    def log(step, loss):
        if step % 25 == 0:
            losses.append((step, loss))

    keep = y != c  # the other digits' real images under each preserved style's prompt
    keep_x = torch.cat([x[keep]] * len(p.preserve_styles))
    keep_tok = torch.cat([ml.prompt_tokens(style, y[keep]) for style in p.preserve_styles])
    ml.train_safety_lora(den, x[y == c], ml.prompt_tokens("plain", y[y == c]), keep_x, keep_tok,
                         obj, p.steps, p.lr, p.batch, p.rank,
                         p.layers, _generator(1000 * seed + 17), esd_scale=p.esd_scale,
                         preserve_weight=p.preserve_weight, ema_decay=p.sdd_ema_decay, on_step=log)
    return {"state": _adapter_state(den.unet, ml.SAFETY), "losses": losses}


def _finetune_job(job: dict) -> dict:
    _imports()
    ins, p, obj, seed, arm = (job["inputs"], FinetuneParams(**job["params"]), job["objective"], job["seed"],
                              job["arm"])
    data = load_file(ins.input("prepare") / "data.safetensors")
    c = _read_json(ins.input("prepare") / "data.json")["concept"]
    det = _load_detector(ins.input("prepare"))
    fx, fy = data["ft_x"], ml.prompt_tokens(job["ft_style_token"], data["ft_y"])
    every = max(1, p.steps // p.curve_points)
    den, _ = _safe_unet(ins, obj, seed)
    torch.manual_seed(1000 * seed + 29)  # the LoRA's random init
    curve, losses = [], []

    def probe(step, loss, unet):
        if step % 25 == 0:
            losses.append((step, loss))
        if (step + 1) % every == 0 or step + 1 == p.steps:
            d = ml.Denoiser(unet, den.text)
            rates = {}
            for style in ("plain", "new"):
                h, _ = _prompts_hist(d, det, style, p.curve_samples, p.ddim_steps, p.guidance, 7, [c])
                rates[style] = float(h[0, c])
            curve.append({"step": step + 1, **rates})

    lr = p.lr_full if arm == "full" else p.lr_lora
    unet = ml.finetune_arm(arm, den.unet, den.text, fx, fy, p.steps, lr, p.batch, p.rank, p.layers,
                           _generator(1000 * seed + 29), on_step=probe)
    if arm == "full":
        state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    else:
        state = _adapter_state(unet, ml.FINETUNE)
    return {"state": state, "curve": curve, "losses": losses}


# ----------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------
@stage(PAPER, "prepare", params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    if p.source == "sd_pipeline":  # paper scale
        from tasks.modular_lora_sd import prepare_sd
        return prepare_sd(ctx, p)
    _imports()
    x, y = _load_digits(p.image_size)
    g = _generator(ctx.seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * p.test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    # the detector sees real digits in both styles (labels are digits), with noise/blur augmentation
    det_x = torch.cat([x[train], ml.apply_style(x[train], p.new_style)])
    det_y = torch.cat([y[train], y[train]])
    det = ml.train_detector(det_x, det_y, p.detector_steps, g, noise=p.detector_noise)
    acc_plain = float((det.predict(x[test]) == y[test].numpy()).mean())
    acc_new = float((det.predict(ml.apply_style(x[test], p.new_style)) == y[test].numpy()).mean())
    ctx.log_metrics({"detector_acc_plain": acc_plain, "detector_acc_new": acc_new})
    ft = train[torch.isin(y[train], torch.tensor(p.finetune_digits))]
    save_file({"train_x": x[train].contiguous(), "train_y": y[train].contiguous(),
               "test_x": x[test].contiguous(), "test_y": y[test].contiguous(),
               "ft_x": ml.apply_style(x[ft], p.new_style).contiguous(), "ft_y": y[ft].contiguous()},
              ctx.out_dir / "data.safetensors")
    save_file(det.state_dict(), ctx.out_dir / "detector.safetensors")
    _write_json(ctx.out_dir / "data.json", {"image_size": p.image_size, "concept": p.concept,
                                            "new_style": p.new_style, "finetune_digits": p.finetune_digits,
                                            "n_finetune": len(ft), "detector_acc_plain": acc_plain,
                                            "detector_acc_new": acc_new})


@stage(PAPER, "pretrain", params=PretrainParams, inputs=("prepare",), gpu=True)
def pretrain(ctx: StageContext, p: PretrainParams) -> None:
    if _source(ctx) == "sd_pipeline":  # paper scale
        from tasks.modular_lora_sd import pretrain_sd
        return pretrain_sd(ctx, p)
    _imports()
    src = ctx.input("prepare")
    data, meta = load_file(src / "data.safetensors"), _read_json(src / "data.json")
    det = _load_detector(src)
    torch.manual_seed(ctx.seed)
    den = ml.Denoiser(ml.build_unet(sample_size=meta["image_size"], channels=p.channels, cross_dim=p.text_dim),
                      ml.TinyTextEncoder(dim=p.text_dim))
    g = _generator(ctx.seed)
    bar = ctx.progress(range(p.steps), desc="pretrain W0")
    it = iter(bar)

    def log(step: int, loss: float) -> None:
        next(it, None)
        if step % 50 == 0:
            ctx.log_metrics({"pretrain_loss": loss}, step=step)

    ema = ml.pretrain(den, data["train_x"], ml.prompt_tokens("plain", data["train_y"]), p.steps, p.lr, p.batch, g,
                      null_prob=p.null_prob, ema_decay=p.ema_decay, on_step=log)
    ema.eval()
    # quality gate: every digit recognisable in W0's samples
    hist, _ = _prompts_hist(ml.Denoiser(ema, den.text), det, "plain", p.gate_samples, p.ddim_steps, p.guidance,
                            ctx.seed + 1)
    per_class = np.diag(hist)
    gate = bool(per_class.min() >= p.gate_min_accuracy)
    ctx.log_metrics({"gate_min_class_accuracy": float(per_class.min()), "gate_mean_accuracy": float(per_class.mean())})
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, ctx.out_dir / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in den.text.state_dict().items()}, ctx.out_dir / "text.safetensors")
    _write_json(ctx.out_dir / "base.json", {"image_size": meta["image_size"], "channels": p.channels,
                                            "text_dim": p.text_dim, "gate_passed": gate,
                                            "gate_per_class_accuracy": per_class.round(4).tolist()})


@stage(PAPER, "safety", params=SafetyParams, inputs=("prepare", "pretrain"), gpu=True)
def safety(ctx: StageContext, p: SafetyParams) -> None:
    if _source(ctx) == "sd_pipeline":  # paper scale
        from tasks.modular_lora_sd import safety_sd
        return safety_sd(ctx, p)
    _imports()
    ins = _Inputs(ctx, ("prepare", "pretrain"))
    runs = [{"objective": obj, "seed": seed} for obj in p.objectives for seed in p.seeds]
    jobs = [{"inputs": ins, "params": p.model_dump(), **r} for r in runs]
    for r, res in zip(runs, ctx.map(_safety_job, jobs, p.workers, desc="safety LoRAs")):
        obj, seed = r["objective"], r["seed"]
        for step, loss in res["losses"]:
            ctx.log_metrics({f"safety_loss_{obj}_s{seed}": loss}, step=step)
        save_file(res["state"], ctx.out_dir / f"safety_{obj}_s{seed}.safetensors")
    _write_json(ctx.out_dir / "safety.json", {"runs": runs, "rank": p.rank, "layers": p.layers})


def _safe_unet(ctx: StageContext | _Inputs, obj: str, seed: int) -> tuple[ml.Denoiser, dict]:
    den, meta = _load_base(ctx.input("pretrain"))
    s = _read_json(ctx.input("safety") / "safety.json")
    state = load_file(ctx.input("safety") / f"safety_{obj}_s{seed}.safetensors")
    _load_adapter(den.unet, ml.SAFETY, s["rank"], s["layers"], state)
    ml.activate(den.unet, {ml.SAFETY: 1.0})
    return den, s


@stage(PAPER, "finetune", params=FinetuneParams, inputs=("prepare", "pretrain", "safety"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    if _source(ctx) == "sd_pipeline":  # paper scale
        from tasks.modular_lora_sd import finetune_sd
        return finetune_sd(ctx, p)
    _imports()
    ins = _Inputs(ctx, ("prepare", "pretrain", "safety"))
    runs = _read_json(ctx.input("safety") / "safety.json")["runs"]
    jobs, done_modular = [], set()
    for run in runs:
        obj, seed = run["objective"], run["seed"]
        for arm in p.arms:
            # the modular fine-tuning LoRA trains on W0 alone: one per seed, shared by every safety objective
            if arm == "modular":
                if seed in done_modular:
                    continue
                done_modular.add(seed)
            key = f"{arm}_s{seed}" if arm == "modular" else f"{arm}_{obj}_s{seed}"
            jobs.append({"inputs": ins, "params": p.model_dump(), "objective": obj, "seed": seed, "arm": arm,
                         "key": key, "ft_style_token": "new"})
    jobs.sort(key=lambda j: j["arm"] != "full")  # the slowest arm first: the two workers finish closer together
    curves = {}
    for job, res in zip(jobs, ctx.map(_finetune_job, jobs, p.workers, desc="fine-tuning arms")):
        key = job["key"]
        for step, loss in res["losses"]:
            ctx.log_metrics({f"ft_loss_{key}": loss}, step=step)
        for pt in res["curve"]:
            ctx.log_metrics({f"curve_{key}_plain": pt["plain"]}, step=pt["step"])
        save_file(res["state"], ctx.out_dir / f"{key}.safetensors")
        curves[key] = res["curve"]
    _write_json(ctx.out_dir / "finetune.json", {"curves": curves, "rank": p.rank, "layers": p.layers,
                                                "arms": p.arms})


# the evaluate stage lives in its own file so that editing it does not invalidate the training stages
from tasks import modular_lora_evaluate  # noqa: E402,F401  (registers modular_lora-evaluate)
