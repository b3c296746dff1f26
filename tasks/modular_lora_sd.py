"""modular_lora at paper scale (``prepare.source: sd_pipeline``): the same five stages on a Stable Diffusion
pipeline folder, an image-caption folder, a prompts file and a pluggable detector (docs/modular_lora.md).

prepare  -> checks every path, VAE latents of the caption images (train split), detector features of the
            held-out images (FD reference), the prompts
pretrain -> records the pipeline (W0 = its UNet, nothing is trained)
safety   -> the safety LoRA per objective (ESD, SDD) and seed, x_t by partial DDIM + CFG sampling
finetune -> the arms full / lora_on_safe / modular on the caption latents, with re-emergence probes
evaluate -> harmful rate of the concept prompts (detector), benign prompts' concept rate, task FD on the
            held-out captions (or the file's task prompts), model arithmetic, claims, plots
Each stage of tasks/modular_lora*.py hands over to these when the prepared source is ``sd_pipeline``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

from tasks.core import MissingInputError, ParamsError, StageContext
from tasks.modular_lora import _adapter_state, _imports, _load_adapter, _read_json, _summarize, _write_json

SAMPLE_BATCH = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------------------------
# loading the local inputs (every error names the params key and the file)
# ----------------------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return f"modular_lora.prepare.{name}"


def check_pipeline_folder(model_dir: str) -> Path:
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise MissingInputError(
            f"{_key('model_dir')} = '{model_dir}' is not a StableDiffusionPipeline folder (no model_index.json). "
            f"Save one with `StableDiffusionPipeline.save_pretrained(...)` (e.g. SD v1.4) and point the key at it.")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise MissingInputError(f"{_key('model_dir')} = '{model_dir}' has no '{sub}/' subfolder; "
                                    f"a StableDiffusionPipeline folder needs unet, vae, text_encoder, tokenizer, "
                                    f"scheduler.")
    return path


def load_parts(model_dir: str, device, resolution: int):
    """The pipeline's parts (``StableDiffusionPipeline.from_pretrained`` of a local folder), frozen."""
    import torch
    from diffusers import StableDiffusionPipeline

    from models.modular_lora_sd import SDParts

    path = check_pipeline_folder(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, dtype=torch.float32)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ParamsError(f"{_key('resolution')} = {resolution} is not a multiple of the VAE's downsampling "
                          f"factor {factor}.")
    if pipe.unet.config.cross_attention_dim != pipe.text_encoder.config.hidden_size:
        raise MissingInputError(f"{_key('model_dir')} = '{model_dir}': the UNet's cross_attention_dim "
                                f"{pipe.unet.config.cross_attention_dim} does not match the text encoder's "
                                f"hidden size {pipe.text_encoder.config.hidden_size}.")
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise MissingInputError(f"{_key('model_dir')} = '{model_dir}': the scheduler predicts "
                                f"'{pipe.scheduler.config['prediction_type']}'; ESD/SDD and the fine-tuning loss "
                                f"here are written for ε-prediction models (SD 1.x).")
    parts = SDParts(pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device), pipe.tokenizer,
                    dict(pipe.scheduler.config), device, resolution // factor)
    return parts.freeze()


def read_caption_folder(folder: str) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of an image-caption folder.

    Layouts: the Hugging Face imagefolder one (``metadata.jsonl`` with ``file_name`` and ``text`` (or
    ``caption``) per line, paths relative to the folder, e.g. an export of the Pokémon BLIP captions), or
    ``images/*.png`` (or the folder's own images) each with a caption file of the same stem ``.txt``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(f"{_key('finetune_folder')} = '{folder}' is not a folder.")
    meta = root / "metadata.jsonl"
    pairs = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("text", row.get("caption"))
            if "file_name" not in row or text is None:
                raise MissingInputError(f"{meta} line {n} needs 'file_name' and 'text' (set by "
                                        f"{_key('finetune_folder')}).")
            pairs.append((root / row["file_name"], str(text)))
    else:
        images = root / "images" if (root / "images").is_dir() else root
        for img in sorted(f for f in images.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            cap = img.with_suffix(".txt")
            if not cap.is_file():
                raise MissingInputError(f"{_key('finetune_folder')}: '{img}' has no caption file '{cap.name}' "
                                        f"and the folder has no metadata.jsonl.")
            pairs.append((img, cap.read_text().strip()))
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise MissingInputError(f"{_key('finetune_folder')}: images listed but missing: {missing[:3]}")
    if len(pairs) < 2:
        raise MissingInputError(f"{_key('finetune_folder')} = '{folder}' has {len(pairs)} image-caption pairs; "
                                f"at least 2 are needed (fine-tuning and a held-out FD reference).")
    return pairs


def load_images(paths: list[Path], resolution: int):
    """RGB images resized (short side) and centre-cropped to ``resolution``, in [-1, 1] (N, 3, R, R)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        s = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * s)), max(resolution, round(img.height * s))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def read_eval_prompts(path: str) -> dict[str, list[str]]:
    """Prompts of the evaluation: ``concept`` (required), ``benign`` and ``task`` (optional).

    A JSON file ``{"concept": [...], "benign": [...], "task": [...]}``, or a text file with one prompt per
    line prefixed ``concept:``, ``benign:`` or ``task:`` (``#`` starts a comment line).
    """
    f = Path(path)
    if not f.is_file():
        raise MissingInputError(f"{_key('eval_prompts')} = '{path}' is not a file.")
    if f.suffix == ".json":
        data = json.loads(f.read_text())
        if not isinstance(data, dict):
            raise MissingInputError(f"{_key('eval_prompts')}: '{path}' must hold a JSON object with lists "
                                    f"'concept', 'benign', 'task'.")
    else:
        data = {}
        for n, line in enumerate(f.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, sep, prompt = line.partition(":")
            if not sep or kind.strip() not in ("concept", "benign", "task"):
                raise MissingInputError(f"{_key('eval_prompts')}: '{path}' line {n} must start with 'concept:', "
                                        f"'benign:' or 'task:'.")
            data.setdefault(kind.strip(), []).append(prompt.strip())
    unknown = set(data) - {"concept", "benign", "task"}
    if unknown:
        raise MissingInputError(f"{_key('eval_prompts')}: '{path}' has unknown groups {sorted(unknown)}; "
                                f"use concept, benign, task.")
    prompts = {k: [str(p) for p in data.get(k, [])] for k in ("concept", "benign", "task")}
    if not prompts["concept"]:
        raise MissingInputError(f"{_key('eval_prompts')}: '{path}' has no concept prompts.")
    return prompts


def _classifier(folder: str, key: str, device, label: str | None = None, threshold: float = 0.5):
    import torch
    from transformers import AutoModelForImageClassification

    from models.modular_lora_sd import ImageClassifierDetector

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{_key(key)} = '{folder}' is neither a `from_pretrained` image-classifier "
                                f"folder (no config.json) nor a 'module:factory' plug-in.")
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    index = 0
    if label is not None:
        label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
        if label in label2id:
            index = label2id[label]
        elif label.lstrip("-").isdigit():
            index = int(label)
        else:
            raise ParamsError(f"{_key('detector_label')} = '{label}' is neither a label of '{folder}' "
                              f"({sorted(label2id)}) nor an index.")
        if not 0 <= index < model.config.num_labels:
            raise ParamsError(f"{_key('detector_label')} = '{label}': index {index} is outside the "
                              f"{model.config.num_labels} labels of '{folder}'.")
    proc = path / "preprocessor_config.json"
    pc = json.loads(proc.read_text()) if proc.is_file() else {}
    size = pc.get("size") or {}
    side = getattr(model.config, "image_size", 224)
    hw = ((size["height"], size["width"]) if "height" in size else
          (size["shortest_edge"],) * 2 if "shortest_edge" in size else
          (size, size) if isinstance(size, int) else (side, side))
    return ImageClassifierDetector(model, index, hw, pc.get("image_mean", [0.5] * 3), pc.get("image_std", [0.5] * 3),
                                   device, threshold)


def load_detector(meta: dict, device):
    """The harm detector named in prepare's data.json: a local image-classifier folder, or a plug-in.

    A plug-in is ``package.module:factory``; ``factory(label=..., threshold=..., device=...)`` returns an
    object with ``is_concept(images) -> bool array`` (images in [0, 1], (N, 3, H, W)) and, optionally,
    ``features(images) -> (N, D) array``.
    """
    spec = meta["detector"]
    if ":" in spec and not Path(spec).exists():
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise MissingInputError(f"{_key('detector')} = '{spec}': cannot import the plug-in ({exc}).") from exc
        return factory(label=meta["detector_label"], threshold=meta["detector_threshold"], device=device)
    return _classifier(spec, "detector", device, meta["detector_label"] or "0", meta["detector_threshold"])


def load_feature_model(meta: dict, device, detector=None):
    """The FD feature space: ``feature_model`` (an image-classifier folder) or else the detector's own."""
    if meta["feature_model"]:
        return _classifier(meta["feature_model"], "feature_model", device)
    detector = detector or load_detector(meta, device)
    if not hasattr(detector, "features"):
        raise ParamsError(f"the detector '{meta['detector']}' has no features(); set {_key('feature_model')} "
                          f"to an image-classifier folder for the FD feature space.")
    return detector


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(int(seed))


def _parts(ctx: StageContext):
    meta = _read_json(ctx.input("prepare") / "data.json")
    return load_parts(meta["model_dir"], ctx.device, meta["resolution"]), meta


def _safe_parts(ctx: StageContext, obj: str, seed: int):
    """The pipeline with the trained safety adapter of (objective, seed) loaded and active."""
    from models import modular_lora as ml
    from safetensors.torch import load_file

    parts, meta = _parts(ctx)
    s = _read_json(ctx.input("safety") / "safety.json")
    _load_adapter(parts.unet, ml.SAFETY, s["rank"], s["layers"],
                  load_file(ctx.input("safety") / f"safety_{obj}_s{seed}.safetensors"))
    parts.unet.to(ctx.device)
    ml.activate(parts.unet, {ml.SAFETY: 1.0})
    return parts, meta


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------
def prepare_sd(ctx: StageContext, p) -> None:
    _imports()  # binds tasks.modular_lora's helpers (_load_adapter) to torch and the models
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from models.modular_lora_sd import concept_rate

    check_pipeline_folder(p.model_dir)
    pairs = read_caption_folder(p.finetune_folder)
    prompts = read_eval_prompts(p.eval_prompts)
    meta = {"source": "sd_pipeline", "model_dir": p.model_dir, "resolution": p.resolution,
            "concept_prompt": p.concept_prompt, "detector": p.detector, "detector_label": str(p.detector_label),
            "detector_threshold": p.detector_threshold, "feature_model": p.feature_model}
    detector = load_detector(meta, ctx.device)
    features = load_feature_model(meta, ctx.device, detector)
    parts = load_parts(p.model_dir, ctx.device, p.resolution)

    perm = torch.randperm(len(pairs), generator=_generator(ctx.seed)).tolist()
    n_test = min(len(pairs) - 1, max(1, int(len(pairs) * p.test_fraction)))
    test, train = [pairs[i] for i in perm[:n_test]], [pairs[i] for i in perm[n_test:]]
    latents = []
    for i in ctx.progress(range(0, len(train), SAMPLE_BATCH), desc="VAE latents"):
        latents.append(parts.encode_images(load_images([q for q, _ in train[i:i + SAMPLE_BATCH]], p.resolution)))
    real_test = (load_images([q for q, _ in test], p.resolution) + 1) / 2
    real_rate = concept_rate(detector, real_test)
    ref = np.asarray(features.features(real_test), dtype=np.float32)
    save_file({"latents": torch.cat(latents).contiguous()}, ctx.out_dir / "latents.safetensors")
    save_file({"features": torch.from_numpy(ref).contiguous()}, ctx.out_dir / "reference_features.safetensors")
    if not prompts["task"]:  # task quality on the held-out captions of the fine-tuning domain
        prompts["task"] = [c for _, c in test]
    ctx.log_metrics({"n_finetune": len(train), "n_reference": len(test), "detector_rate_real_reference": real_rate})
    _write_json(ctx.out_dir / "data.json", {
        **meta, "train_captions": [c for _, c in train], "test_captions": [c for _, c in test],
        "prompts": prompts, "n_finetune": len(train), "detector_rate_real_reference": real_rate,
        "latent_size": parts.latent_size})


def pretrain_sd(ctx: StageContext, p) -> None:
    """W0 is the pipeline's UNet: load it through the same code path and record what it is."""
    _imports()  # binds tasks.modular_lora's helpers (_load_adapter) to torch and the models
    parts, meta = _parts(ctx)
    n = sum(q.numel() for q in parts.unet.parameters())
    ctx.log_metrics({"unet_parameters": float(n)})
    _write_json(ctx.out_dir / "base.json", {
        "source": "sd_pipeline", "model_dir": meta["model_dir"], "unet_parameters": n,
        "unet_config": {k: v for k, v in parts.unet.config.items() if isinstance(v, (int, float, str, list))},
        "text_encoder_hidden_size": parts.text_encoder.config.hidden_size, "trained": False,
        "gate_passed": None, "gate_per_class_accuracy": None})


def safety_sd(ctx: StageContext, p) -> None:
    _imports()  # binds tasks.modular_lora's helpers (_load_adapter) to torch and the models
    from safetensors.torch import save_file

    from models import modular_lora as ml
    from models.modular_lora_sd import train_safety_lora_sd

    runs = []
    for obj in p.objectives:
        for seed in p.seeds:
            parts, meta = _parts(ctx)
            bar = iter(ctx.progress(range(p.steps), desc=f"safety {obj} seed {seed}"))

            def log(step, loss, obj=obj, seed=seed, bar=bar):
                next(bar, None)
                if step % 25 == 0:
                    ctx.log_metrics({f"safety_loss_{obj}_s{seed}": loss}, step=step)

            train_safety_lora_sd(parts, meta["concept_prompt"], obj, p.steps, p.lr, p.rank, p.layers,
                                 _generator(1000 * seed + 17), ddim_steps=p.ddim_steps, guidance=p.guidance,
                                 esd_scale=p.esd_scale, ema_decay=p.sdd_ema_decay, batch=p.batch,
                                 keep_prompts=meta["prompts"]["benign"], preserve_weight=p.preserve_weight,
                                 on_step=log)
            save_file(_cpu(_adapter_state(parts.unet, ml.SAFETY)), ctx.out_dir / f"safety_{obj}_s{seed}.safetensors")
            runs.append({"objective": obj, "seed": seed})
    _write_json(ctx.out_dir / "safety.json", {"runs": runs, "rank": p.rank, "layers": p.layers,
                                              "source": "sd_pipeline"})


def finetune_sd(ctx: StageContext, p) -> None:
    _imports()  # binds tasks.modular_lora's helpers (_load_adapter) to torch and the models
    from safetensors.torch import load_file, save_file

    from models import modular_lora as ml
    from models.modular_lora_sd import concept_rate, finetune_arm_sd, generate

    latents = load_file(ctx.input("prepare") / "latents.safetensors")["latents"]
    meta = _read_json(ctx.input("prepare") / "data.json")
    detector = load_detector(meta, ctx.device)
    concept_prompts = meta["prompts"]["concept"]
    per_prompt = max(1, p.curve_samples // len(concept_prompts))
    runs = _read_json(ctx.input("safety") / "safety.json")["runs"]
    every = max(1, p.steps // p.curve_points)
    curves, done_modular = {}, set()
    for run in runs:
        obj, seed = run["objective"], run["seed"]
        for arm in p.arms:
            if arm == "modular" and seed in done_modular:  # trains on W0 alone: shared by the objectives
                continue
            parts, _ = _safe_parts(ctx, obj, seed)
            key = f"{arm}_s{seed}" if arm == "modular" else f"{arm}_{obj}_s{seed}"
            curve = []
            bar = iter(ctx.progress(range(p.steps), desc=f"finetune {key}"))

            def probe(step, loss, unet, key=key, curve=curve, bar=bar, parts=parts):
                next(bar, None)
                if step % 25 == 0:
                    ctx.log_metrics({f"ft_loss_{key}": loss}, step=step)
                if (step + 1) % every == 0 or step + 1 == p.steps:
                    view = dataclasses.replace(parts, unet=unet)
                    imgs = generate(view, concept_prompts, per_prompt, p.ddim_steps, p.guidance, 7, SAMPLE_BATCH)
                    rate = concept_rate(detector, imgs)
                    curve.append({"step": step + 1, "plain": rate, "new": rate})
                    ctx.log_metrics({f"curve_{key}": rate}, step=step + 1)

            lr = p.lr_full if arm == "full" else p.lr_lora
            unet = finetune_arm_sd(arm, parts, latents, meta["train_captions"], p.steps, lr, p.batch, p.rank,
                                   p.layers, _generator(1000 * seed + 29), on_step=probe)
            state = unet.state_dict() if arm == "full" else _adapter_state(unet, ml.FINETUNE)
            save_file(_cpu(state), ctx.out_dir / f"{key}.safetensors")
            curves[key] = curve
            if arm == "modular":
                done_modular.add(seed)
            del unet, parts
    _write_json(ctx.out_dir / "finetune.json", {"curves": curves, "rank": p.rank, "layers": p.layers,
                                                "arms": p.arms, "source": "sd_pipeline"})


def _arm_parts(ctx: StageContext, obj: str, seed: int, arms: list[str]):
    """(name, parts) for every model of one (objective, seed) as used at inference, built one at a time."""
    from safetensors.torch import load_file

    from models import modular_lora as ml

    ft_dir = ctx.input("finetune")
    ft = _read_json(ft_dir / "finetune.json")
    parts, _ = _safe_parts(ctx, obj, seed)
    yield "safe", parts
    ml.activate(parts.unet, {ml.SAFETY: -1.0})
    yield "W0_minus_safe", parts
    if "full" in arms:
        parts, _ = _parts(ctx)
        parts.unet.load_state_dict(load_file(ft_dir / f"full_{obj}_s{seed}.safetensors"))
        yield "full", parts
    if "lora_on_safe" in arms:
        parts, _ = _safe_parts(ctx, obj, seed)
        parts.unet = ml.merged_unet(parts.unet, {ml.SAFETY: 1.0}).to(ctx.device)
        _load_adapter(parts.unet, ml.FINETUNE, ft["rank"], ft["layers"],
                      load_file(ft_dir / f"lora_on_safe_{obj}_s{seed}.safetensors"))
        parts.unet.to(ctx.device).eval()
        for name, w in (("lora_on_safe", 1.0), ("W0_plus_safe_minus_ft", -1.0)):
            ml.activate(parts.unet, {ml.FINETUNE: w})
            yield name, parts
    if "modular" in arms:
        parts, _ = _safe_parts(ctx, obj, seed)
        _load_adapter(parts.unet, ml.FINETUNE, ft["rank"], ft["layers"],
                      load_file(ft_dir / f"modular_s{seed}.safetensors"))
        parts.unet.to(ctx.device)
        ml.activate(parts.unet, {ml.SAFETY: 1.0, ml.FINETUNE: 1.0})  # W0 + ΔW_safe + ΔW_ft, exact sum
        yield "modular", parts


def _model_metrics(parts, prompts, detector, features, ref, p, seed):
    import numpy as np

    from models.modular_lora import frechet_distance
    from models.modular_lora_sd import concept_rate, generate

    n = p.samples_per_prompt
    concept = generate(parts, prompts["concept"], n, p.ddim_steps, p.guidance, seed, SAMPLE_BATCH)
    task = generate(parts, prompts["task"], p.task_samples_per_prompt, p.ddim_steps, p.guidance, seed + 1,
                    SAMPLE_BATCH)
    m = {"harmful": concept_rate(detector, concept),
         "task_fd": frechet_distance(np.asarray(features.features(task), dtype=np.float64), ref),
         "task_to_concept": concept_rate(detector, task)}
    if prompts["benign"]:
        m["benign_to_concept"] = concept_rate(detector, generate(parts, prompts["benign"], n, p.ddim_steps,
                                                                 p.guidance, seed + 2, SAMPLE_BATCH))
    grid = [concept[i * n] for i in range(min(4, len(prompts["concept"])))] + list(task[:4])
    return m, grid


def _claims_sd(summary: dict, p) -> dict[str, bool]:
    claims = {}
    for obj, s in summary.items():
        def mean(arm, key):
            return s[arm][key]["mean"]
        base_rate, safe_rate = mean("base", "harmful"), mean("safe", "harmful")
        claims[f"safety_works_{obj}"] = bool(base_rate > 0 and safe_rate <= p.safety_ratio * base_rate)
        std_arms = [a for a in ("full", "lora_on_safe") if a in s]
        claims[f"finetuning_backfires_{obj}"] = bool(std_arms) and all(
            mean(a, "harmful") - safe_rate >= p.backfire_margin for a in std_arms)
        if "modular" in s:
            mod = mean("modular", "harmful")
            claims[f"modular_lora_keeps_safety_{obj}"] = bool(
                mod - safe_rate <= p.modular_margin and all(mod < mean(a, "harmful") for a in std_arms))
            claims[f"modular_lora_learns_task_{obj}"] = bool(std_arms) and all(
                mean("modular", "task_fd") <= (1 + p.task_tolerance) * mean(a, "task_fd") for a in std_arms)
    for name in ("safety_works", "finetuning_backfires", "modular_lora_keeps_safety", "modular_lora_learns_task"):
        keys = [k for k in claims if k.startswith(name + "_")]
        claims[name] = bool(keys) and all(claims[k] for k in keys)
    return claims


def evaluate_sd(ctx: StageContext, p) -> None:
    _imports()  # binds tasks.modular_lora's helpers (_load_adapter) to torch and the models
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from safetensors.torch import load_file

    meta = _read_json(ctx.input("prepare") / "data.json")
    prompts = meta["prompts"]
    detector = load_detector(meta, ctx.device)
    features = load_feature_model(meta, ctx.device, detector)
    ref = load_file(ctx.input("prepare") / "reference_features.safetensors")["features"].double().numpy()
    ft = _read_json(ctx.input("finetune") / "finetune.json")
    runs = _read_json(ctx.input("safety") / "safety.json")["runs"]
    base, _ = _parts(ctx)
    base_m, grids = {}, {}
    base_m, grids["base"] = _model_metrics(base, prompts, detector, features, ref, p, ctx.seed)
    del base
    per_run = {}
    for run in ctx.progress(runs, desc="evaluate"):
        obj, seed = run["objective"], run["seed"]
        for name, parts in _arm_parts(ctx, obj, seed, ft["arms"]):
            m, grid = _model_metrics(parts, prompts, detector, features, ref, p, ctx.seed)
            per_run.setdefault(obj, {}).setdefault(name, {})[str(seed)] = m
            grids.setdefault(f"{name}_{obj}", grid)
    summary = _summarize(base_m, per_run)
    claims = _claims_sd(summary, p)
    for obj, s in summary.items():
        ctx.log_metrics({f"{obj}_{arm}_harmful": v["harmful"]["mean"] for arm, v in s.items()})
    ctx.write_metrics({"claims": claims, "source": "sd_pipeline", "concept": meta["concept_prompt"],
                       "detector": meta["detector"], "detector_rate_real_reference": meta["detector_rate_real_reference"],
                       "seeds": sorted({r["seed"] for r in runs}), "summary": summary, "margins": p.model_dump(),
                       "n_prompts": {k: len(v) for k, v in prompts.items()}})
    curve_rows = [{"arm": k, "step": pt["step"], "harmful": pt["plain"]} for k, pts in ft["curves"].items()
                  for pt in pts]
    _write_json(ctx.results_file("curves/reemergence.json"), curve_rows)

    order = ["base", "safe", "full", "lora_on_safe", "modular", "W0_minus_safe", "W0_plus_safe_minus_ft"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 3.6), squeeze=False)
    for ax, (obj, s) in zip(axes[0], summary.items()):
        names = [a for a in order if a in s]
        ax.bar(range(len(names)), [s[a]["harmful"]["mean"] for a in names],
               yerr=[s[a]["harmful"]["std"] for a in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{obj.upper()}: harmful rate of '{meta['concept_prompt']}' prompts", fontsize=8)
    fig.tight_layout()
    ctx.log_figure(fig, "harmful_rate_per_arm.png")
    names = list(grids)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.imshow(torch.cat(list(grids[name]), dim=2).permute(1, 2, 0).numpy())
        ax.set_axis_off()
        ax.set_title(f"{name}: concept prompts | task prompts", fontsize=7)
    fig.tight_layout()
    ctx.log_figure(fig, "samples_grid.png")
