"""The pretrained classifier: its trainable part ('full': the upper encoder layers, pooler and head; 'lora':
peft LoRA adapters plus the head) and, at CPU scale, the frozen lower layers computed once.

`FrozenFeatureCache` holds the hidden states after the frozen layers. They are the same for every seed and
variant of one stage (the frozen layers keep their pretrained weights and LoRA adapts only trained layers),
so a stage creates one cache and passes it to `split_batches` for every model it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.bo_fusion.fusion import TextBatches


def load_classifier(path: Path, num_labels: int, num_layers: int | None) -> nn.Module:
    """A fresh `AutoModelForSequenceClassification` with the pretrained weights from the folder `path`
    (first `num_layers` encoder layers only, when given; the caller sets the seed of the new head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    kw = {"num_labels": num_labels}
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    config = AutoConfig.from_pretrained(path, **kw)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, use_safetensors=True)
    if model.config.pad_token_id is None:  # causal LMs: classify at the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id or 0
    return model


def encoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    base = getattr(hf_model, hf_model.base_model_prefix)
    for attr in ("encoder.layer", "layers", "h"):
        obj = base
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"cannot find the encoder layers of {type(hf_model).__name__}")


class FullClassifier(nn.Module):
    """`model(inputs, attention_mask) -> logits` for a whole Hugging Face classifier (nothing cached)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=inputs, attention_mask=attention_mask).logits


class TopLayersClassifier(nn.Module):
    """The top of a BERT-style `*ForSequenceClassification` model: encoder layers from `n_frozen` on, the
    pooler and the head, run on hidden states cached after the frozen lower layers (a CPU-scale speed-up:
    the frozen part is computed once per example instead of at every step and every fused evaluation).
    With n_frozen equal to the number of layers only the pooler and the head run.
    Shares its modules with `hf_model`, so LoRA adapters injected there are part of it."""

    def __init__(self, hf_model: nn.Module, n_frozen: int):
        super().__init__()
        base = getattr(hf_model, hf_model.base_model_prefix)
        layers = base.encoder.layer
        if not 0 < n_frozen <= len(layers):
            raise ValueError(f"n_frozen must be in 1..{len(layers)}, got {n_frozen}")
        self.n_frozen = n_frozen
        self.layers = nn.ModuleList(layers[n_frozen:])
        self.pooler = base.pooler
        self.dropout = hf_model.dropout
        self.classifier = hf_model.classifier

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(self.pooler(hidden)))


@torch.no_grad()
def frozen_features(hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_frozen: int,
                    batch_size: int = 256, start: tuple[Tensor, int] | None = None) -> Tensor:
    """Hidden states after the embeddings and the first `n_frozen` encoder layers (only those layers
    run: the layers above are what `TopLayersClassifier` trains). `start` = (hidden states after the
    first m layers, m) continues from features already computed for a lower cut."""
    base = getattr(hf_model, hf_model.base_model_prefix)
    base.eval()
    first = 0 if start is None else start[1]
    if not 0 <= first <= n_frozen:
        raise ValueError(f"cannot continue from layer {first} to {n_frozen}")
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        mask = attention_mask[i:i + batch_size]
        hidden = base.embeddings(input_ids=input_ids[i:i + batch_size]) if start is None \
            else start[0][i:i + batch_size]
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in base.encoder.layer[first:n_frozen]:
            o = layer(hidden, attention_mask=additive)
            hidden = o[0] if isinstance(o, tuple) else o
        out.append(hidden)
    return torch.cat(out)


class Trainable(NamedTuple):
    hf: nn.Module       # the Hugging Face classifier (LoRA adapters injected in place)
    module: nn.Module   # called as module(inputs, attention_mask) -> logits
    n_cached: int       # frozen lower layers whose outputs are the module's inputs (0: token ids)


def build_trainable(path: Path, num_labels: int, *, num_layers: int | None, variant: str, frozen_layers: int,
                    cache_frozen: bool, lora_rank: int, lora_alpha: float, seed: int,
                    device: torch.device | str) -> Trainable:
    """The pretrained classifier with its lower `frozen_layers` frozen ('full') or LoRA adapters of rank
    `lora_rank` on the layers above them plus a trained head ('lora'), on `device`. With `cache_frozen`
    the module runs only the layers above the frozen ones (inputs: `FrozenFeatureCache` features)."""
    torch.manual_seed(seed)
    hf = load_classifier(path, num_labels, num_layers)
    n_layers = len(encoder_layers(hf))
    if frozen_layers > n_layers or (variant == "lora" and frozen_layers == n_layers):
        raise ValueError(f"frozen_layers={frozen_layers} leaves no layer of the {n_layers} for {variant}")
    for p in hf.parameters():
        p.requires_grad_(False)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                         target_modules=["query", "value", "q_proj", "v_proj"],
                         layers_to_transform=list(range(frozen_layers, n_layers)))
        get_peft_model(hf, cfg)  # injects adapters into hf in place; head in modules_to_save
    cached = frozen_layers if cache_frozen and frozen_layers > 0 else 0
    module = TopLayersClassifier(hf, cached) if cached else FullClassifier(hf)
    if variant == "full":
        for layer in list(encoder_layers(hf))[frozen_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        prefix = hf.base_model_prefix + "."
        trained = (prefix + "pooler.",) + ((prefix + "embeddings.",) if frozen_layers == 0 else ())
        for name, p in hf.named_parameters():  # frozen_layers 0 fine-tunes everything, embeddings too
            if not name.startswith(prefix) or name.startswith(trained):
                p.requires_grad_(True)
    else:
        for name, p in hf.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.requires_grad_(True)
    hf.to(device)
    return Trainable(hf, module, cached)


class FrozenFeatureCache:
    """Frozen-layer outputs keyed by (model, its depth, the cut, the split, the split's token ids). A cut
    continues from the highest lower cut already computed. One per stage, passed to `split_batches`."""

    def __init__(self) -> None:
        self._features: dict[tuple, Tensor] = {}

    @staticmethod
    def _key(hf: nn.Module, split: str, ids: Tensor, cut: int) -> tuple:
        return (hf.config.name_or_path, len(encoder_layers(hf)), cut, split, tuple(ids.shape), int(ids.sum()))

    def put(self, hf: nn.Module, split: str, ids: Tensor, cut: int, features: Tensor) -> None:
        """Features computed elsewhere (e.g. once by the prepare stage) for this model, split and cut."""
        if features.shape[:2] != ids.shape:
            raise ValueError(f"features {tuple(features.shape)} do not match the token ids {tuple(ids.shape)}")
        self._features[self._key(hf, split, ids, cut)] = features

    def features(self, hf: nn.Module, split: str, ids: Tensor, mask: Tensor, cut: int) -> Tensor:
        def key(n: int) -> tuple:
            return self._key(hf, split, ids, n)

        if key(cut) not in self._features:
            device = next(hf.parameters()).device
            lower = max((n for n in range(1, cut) if key(n) in self._features), default=None)
            start = None if lower is None else (self._features[key(lower)].to(device), lower)
            self._features[key(cut)] = frozen_features(hf, ids.to(device), mask.to(device), cut, start=start)
        return self._features[key(cut)]


def split_batches(trainable: Trainable, tensors: dict[str, Tensor], splits: tuple[str, ...],
                  cache: FrozenFeatureCache) -> dict[str, TextBatches]:
    """The splits (`tensors[f"{split}_ids" | "_mask" | "_labels"]`) as `TextBatches` on the model's device;
    with cached frozen layers the inputs are the hidden states after them, from `cache` (which takes
    `tensors[f"{split}_features{cut}"]`, features after `cut` layers computed beforehand, when present)."""
    device = next(trainable.hf.parameters()).device
    out = {}
    for s in splits:
        ids, mask, y = tensors[f"{s}_ids"], tensors[f"{s}_mask"], tensors[f"{s}_labels"]
        for key in [k for k in tensors if k.startswith(f"{s}_features")]:
            cache.put(trainable.hf, s, ids, int(key.removeprefix(f"{s}_features")), tensors[key].to(device))
        x = cache.features(trainable.hf, s, ids, mask, trainable.n_cached) if trainable.n_cached else ids
        out[s] = TextBatches(x.to(device), mask.to(device), y.long().to(device))
    return out
