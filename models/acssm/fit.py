"""Training and prediction of the acssm models on a split held as tensors (no file I/O, no tracking)."""
from __future__ import annotations

import time

import torch

from models.acssm.networks import MODELS, LossWeights, point_prediction


def build_model(name: str, task: str, obs_dim: int, out_dim: int, cfg: dict, causal: bool,
                image_shape: tuple[int, int, int] | None = None) -> torch.nn.Module:
    """cfg: width, state_dim, num_basis, n_layers, n_heads, dropout, time_scale, init_sigma, skip, sde_dt,
    obs_var, encoder ('mlp' | 'cnn'). ``image_shape`` (C, H, W): the observations are flattened images;
    with encoder 'cnn' the latent models embed them with the conv net (GRU-dt always reads the flat
    vector). ``acssm_noskip`` is ACSSM whose decoder sees only the latent sample (no skip term from z_k)."""
    if name == "acssm_noskip":
        name, cfg = "acssm", {**cfg, "skip": False}
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS) + ['acssm_noskip']}")
    if cfg["encoder"] not in ("mlp", "cnn"):
        raise ValueError(f"encoder must be 'mlp' or 'cnn', got {cfg['encoder']!r}")
    common = dict(task=task, width=cfg["width"], obs_var=cfg["obs_var"])
    if name == "gru_dt":
        return MODELS[name](obs_dim, out_dim, **common)
    common.update(state_dim=cfg["state_dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                  dropout=cfg["dropout"], time_scale=cfg["time_scale"], causal=causal, skip=cfg["skip"],
                  image_shape=tuple(image_shape) if image_shape is not None and cfg["encoder"] == "cnn" else None)
    if name == "acssm":
        return MODELS[name](obs_dim, out_dim, num_basis=cfg["num_basis"], init_sigma=cfg["init_sigma"], **common)
    return MODELS[name](obs_dim, out_dim, dt=cfg["sde_dt"], **common)


def train_step(model, opt, b: dict, weights: LossWeights, n_samples: int, grad_clip: float) -> tuple[float, dict]:
    """One AdamW step on the negative ELBO of batch ``b``; returns (loss, parts)."""
    out = model(b["times"], b["values"], b["mask"], b["valid"], n_samples=n_samples)
    loss, parts = model.loss(out, b["target"], b["target_mask"], weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach()), parts


def train_model(model, data: dict, epochs: int, batch_size: int, lr: float, weight_decay: float,
                weights: LossWeights, n_samples: int, seed: int, grad_clip: float = 1.0,
                on_epoch=None) -> list[dict]:
    """AdamW on the negative ELBO; returns per-epoch {loss, seconds, parts...}."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = data["times"].shape[0]
    history = []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, parts_sum, steps = 0.0, {}, 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss, parts = train_step(model, opt, {k: v[idx] for k, v in data.items()}, weights, n_samples,
                                     grad_clip)
            total += loss
            steps += 1
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        rec = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - start,
               **{k: v / steps for k, v in parts_sum.items()}}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    return history


@torch.no_grad()
def predict(model, data: dict, n_samples: int, batch_size: int = 200) -> dict:
    """Point predictions and sample spread, plus latent moments when the model has them."""
    model.eval()
    preds, stds, lmeans, lvars = [], [], [], []
    for i in range(0, data["times"].shape[0], batch_size):
        b = {k: v[i:i + batch_size] for k, v in data.items()}
        out = model(b["times"], b["values"], b["mask"], b["valid"], n_samples=n_samples)
        preds.append(point_prediction(out["pred"], model.task))
        stds.append(out["pred"].std(0) if out["pred"].shape[0] > 1 else torch.zeros_like(out["pred"][0]))
        if "latent_mean" in out:
            lmeans.append(out["latent_mean"])
            lvars.append(out["latent_var_eig"])
    res = {"pred": torch.cat(preds), "std": torch.cat(stds)}
    if lmeans:
        res["latent_mean"], res["latent_var"] = torch.cat(lmeans), torch.cat(lvars)
    return res
