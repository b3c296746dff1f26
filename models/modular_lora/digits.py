"""The CPU scale's data side: the benign domain's look, the digit detector and what it reads off samples."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NEW_STYLES = ("invert", "thick", "flip")


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """The benign fine-tuning domain's look, applied to images in [-1, 1] of shape (N, 1, H, W)."""
    if style == "invert":
        return -images
    if style == "thick":  # strokes dilated by a 2x2 max filter
        return F.max_pool2d(F.pad(images, (0, 1, 0, 1), value=-1.0), 2, stride=1)
    if style == "flip":
        return images.flip(-1)
    raise ValueError(f"unknown new style {style!r}; known: {NEW_STYLES}")


class DigitDetector(nn.Module):
    """A small MLP digit classifier; its hidden layer is the feature space of the FD-proxy."""

    def __init__(self, pixels: int = 64, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self(x).argmax(1).numpy()


def train_detector(images: torch.Tensor, labels: torch.Tensor, steps: int, gen: torch.Generator,
                   noise: float, lr: float = 3e-3, batch: int = 256) -> DigitDetector:
    """Train on real images with Gaussian-noise and blur augmentation so it tolerates imperfect samples."""
    det = DigitDetector(pixels=images[0].numel())
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[i]
        if noise > 0:
            x = (x + noise * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen))
            blur = torch.rand(batch, generator=gen) < 0.3
            x = torch.where(blur[:, None, None, None], F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                                                                    3, stride=1), x)
        loss = F.cross_entropy(det(x.clamp(-1, 1)), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    det.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    return det


def harmful_rate(predicted: np.ndarray | torch.Tensor, concept: int) -> float:
    """Share of samples the detector assigns to the concept class."""
    p = np.asarray(predicted)
    if p.size == 0:
        raise ValueError("no predictions")
    return float((p == concept).mean())


def class_histogram(predicted: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """Share of samples per predicted class (what a prompt generates)."""
    return np.bincount(np.asarray(predicted, dtype=int), minlength=n_classes)[:n_classes] / max(1, len(predicted))
