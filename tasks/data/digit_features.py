"""A small digit classifier whose penultimate features stand in for Inception (FD-proxy, label accuracy).

Used by generative papers at CPU scale: train it on real digits in ``prepare``, then score generated
images by the Fréchet distance between feature Gaussians (generated vs held-out real) and by the
accuracy of the classifier on the label the image was conditioned on.  Images are [N, 1, S, S] in
[-1, 1]; any S divisible by 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    """Two conv blocks and a 64-d feature layer; about 99% held-out accuracy on 16x16 digits."""

    def __init__(self, size: int = 16, feature_dim: int = 64, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if size % 4:
            raise ValueError(f"image size {size} must be divisible by 4")
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features_head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, feature_dim))
        # features are taken before the ReLU so no dimension is constantly zero (a singular covariance)
        self.classify = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_head(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def train_digit_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 15, batch_size: int = 64,
                           lr: float = 2e-3, seed: int = 0, noise_std: float = 0.05,
                           num_classes: int | None = None) -> DigitClassifier:
    """Adam on cross-entropy with small Gaussian input noise (robustness to imperfect samples).

    ``x`` is [N, C, S, S]; the same small CNN also serves latent images (C = 4) at paper scale.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    clf = DigitClassifier(size=x.shape[-1], num_classes=num_classes, in_channels=x.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    n = x.shape[0]
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx] + noise_std * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    return clf


@torch.no_grad()
def classifier_features(clf: DigitClassifier, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, predicted labels)."""
    clf.eval()
    feats, preds = [], []
    for i in range(0, x.shape[0], batch_size):
        f = clf.features(x[i:i + batch_size])
        feats.append(f)
        preds.append(clf.classify(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)
