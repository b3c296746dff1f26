"""An image-classification folder (``<root>/<class name>/<image>``, classes in sorted order, as
torchvision's ImageFolder and the ImageNet validation layout) preprocessed with a Hugging Face image
processor loaded from a local model folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.errors import MissingInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}


def list_image_folder(root: Path, max_per_class: int | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"Image folder '{root}' does not exist. Set it in params.yaml to a folder "
                                f"with one sub-folder of images per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise MissingInputError(f"Image folder '{root}' has no class sub-folders.")
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix in IMAGE_SUFFIXES)
        files = files[:max_per_class] if max_per_class else files
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise MissingInputError(f"Image folder '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return paths, np.asarray(labels, dtype=np.int64), classes


def load_image_folder(root: Path, processor_dir: Path, max_per_class: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixel values [N, 3, H, W] (float32, processed) and labels."""
    from PIL import Image
    from transformers import AutoImageProcessor

    if not Path(processor_dir).is_dir():
        raise MissingInputError(f"Model folder '{processor_dir}' does not exist; it must hold the image "
                                f"processor config (preprocessor_config.json) saved with save_pretrained.")
    processor = AutoImageProcessor.from_pretrained(str(processor_dir))
    paths, labels, classes = list_image_folder(root, max_per_class)
    pixels = []
    for i in range(0, len(paths), 64):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + 64]]
        pixels.append(processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32))
    return np.concatenate(pixels), labels, classes
