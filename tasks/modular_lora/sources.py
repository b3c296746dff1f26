"""The local inputs of modular_lora's two sources: sklearn's digits (CPU scale) and, for
``prepare.source: sd_pipeline`` (paper scale), a Stable Diffusion pipeline folder, an image-caption
folder, a prompts file and a pluggable harm detector. Every error names the params key and the file.
"""
from __future__ import annotations

import importlib
import os
import json
from pathlib import Path

from tasks.core import MissingInputError, ParamsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_digits(size: int):
    """sklearn's 8×8 digits in [-1, 1] (N, 1, size, size) and their labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


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

    from models.modular_lora.stable_diffusion import SDParts

    path = check_pipeline_folder(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, dtype=torch.float32,
                                                   use_safetensors=True)
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

    from models.modular_lora.stable_diffusion import ImageClassifierDetector

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{_key(key)} = '{folder}' is neither a `from_pretrained` image-classifier "
                                f"folder (no config.json) nor a 'module:factory' plug-in.")
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
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


PLUGINS_ENV = "PAPERFLOWS_DETECTOR_PLUGINS"  # extra packages a detector plug-in may be imported from


def load_detector(data, device):
    """The harm detector named in prepare's data.json (``data``: its record, or prepare's params): a local
    image-classifier folder, or a plug-in.

    A plug-in is ``package.module:factory``; ``factory(label=..., threshold=..., device=...)`` returns an
    object with ``is_concept(images) -> bool array`` (images in [0, 1], (N, 3, H, W)) and, optionally,
    ``features(images) -> (N, D) array``.
    """
    spec, label, threshold = data.detector, str(data.detector_label), data.detector_threshold
    if ":" in spec and not Path(spec).exists():
        module, _, attr = spec.partition(":")
        allowed = ("models", *filter(None, os.environ.get(PLUGINS_ENV, "").split(",")))
        if not any(module == p or module.startswith(p + ".") for p in allowed):
            raise ParamsError(f"{_key('detector')} = '{spec}': plug-ins are imported only from the project's "
                              f"models/ package (e.g. 'models.detectors.nudenet:make') or from packages listed "
                              f"in ${PLUGINS_ENV} (comma-separated); '{module}' is neither.")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise MissingInputError(f"{_key('detector')} = '{spec}': cannot import the plug-in ({exc}).") from exc
        return factory(label=label, threshold=threshold, device=device)
    return _classifier(spec, "detector", device, label or "0", threshold)


def load_feature_model(data, device, detector=None):
    """The FD feature space: ``feature_model`` (an image-classifier folder) or else the detector's own."""
    if data.feature_model:
        return _classifier(data.feature_model, "feature_model", device)
    detector = detector or load_detector(data, device)
    if not hasattr(detector, "features"):
        raise ParamsError(f"the detector '{data.detector}' has no features(); set {_key('feature_model')} "
                          f"to an image-classifier folder for the FD feature space.")
    return detector
