"""prepare: build (or read) the text classification splits and tokenize them with the model's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.bo_fusion.common import PAPER, ModelSpec, PreparedMeta, resolve_model_path
from tasks.core import MissingInputError, Params, StageContext, stage
from tasks.core import io


class PrepareParams(Params):
    source: Literal["templated_sentiment", "jsonl"] = Field(
        description="templated_sentiment (offline, CPU) or jsonl (paper scale: {train,val,test}.jsonl "
                    "with 'text' and 'label')")
    data_dir: str | None = Field(description="jsonl: folder with train/val/test.jsonl (null otherwise)")
    n_train: int = Field(gt=0)
    n_val: int = Field(gt=0)
    n_test: int = Field(gt=0)
    class_prior: list[float] = Field(min_length=3, max_length=3)
    heldout_fraction: float = Field(ge=0, lt=1, description="share of polar adjectives only in val/test")
    label_noise: float = Field(ge=0, lt=1, description="training labels flipped to another class")
    model: ModelSpec

    @model_validator(mode="after")
    def _jsonl(self):
        if self.source == "jsonl" and not self.data_dir:
            raise ValueError("source 'jsonl' needs 'data_dir'")
        if min(self.class_prior) <= 0:
            raise ValueError("class_prior entries must be positive")
        return self


def _read_jsonl(path: Path, limit: int) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(int(row["label"]))
            if len(texts) >= limit:
                break
    return texts, labels


def _texts_and_labels(p: PrepareParams, seed: int) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """{split: (texts, labels)} and the label names."""
    if p.source == "templated_sentiment":
        from tasks.bo_fusion.data import LABELS, build_templated_sentiment

        splits = build_templated_sentiment(p.n_train, p.n_val, p.n_test, class_prior=tuple(p.class_prior),
                                           heldout_fraction=p.heldout_fraction, label_noise=p.label_noise,
                                           seed=seed)
        return {k: (v.texts, v.labels) for k, v in splits.items()}, list(LABELS)
    folder = Path(p.data_dir)
    missing = [s for s in ("train", "val", "test") if not (folder / f"{s}.jsonl").is_file()]
    if missing:
        raise MissingInputError(f"'{PAPER}.prepare.data_dir' = '{folder}' lacks {missing}.jsonl; see "
                                f"docs/{PAPER}.md for the expected layout.")
    data = {s: _read_jsonl(folder / f"{s}.jsonl", n) for s, n in
            (("train", p.n_train), ("val", p.n_val), ("test", p.n_test))}
    n_labels = max(max(v[1]) for v in data.values()) + 1
    return data, [str(i) for i in range(n_labels)]


def _tokenize(data: dict, spec: ModelSpec) -> tuple[dict, int]:
    """Token ids, masks and labels per split, trimmed to the longest example (shorter, same logits)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(spec.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tensors = {}
    for s, (texts, labels) in data.items():
        enc = tok(texts, padding="max_length", truncation=True, max_length=spec.max_length,
                  return_tensors="pt")
        tensors[f"{s}_ids"] = enc["input_ids"]
        tensors[f"{s}_mask"] = enc["attention_mask"]
        tensors[f"{s}_labels"] = torch.tensor(labels)
    used = max(int(tensors[f"{s}_mask"].sum(1).max()) for s in data)
    for s in data:
        tensors[f"{s}_ids"] = tensors[f"{s}_ids"][:, :used].contiguous()
        tensors[f"{s}_mask"] = tensors[f"{s}_mask"][:, :used].contiguous()
    return tensors, used


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Build (or read) the text classification splits and tokenize them with the model's tokenizer."""
    import torch

    data, label_names = _texts_and_labels(p, ctx.seed)
    tensors, used = _tokenize(data, p.model)
    io.save_state(ctx.out_dir / "tokens.safetensors", tensors)
    spec = p.model
    if spec.cache_frozen and spec.frozen_layers > 0:  # the frozen lower layers, once for every later stage
        from models.bo_fusion.backbone import frozen_features, load_classifier

        hf = load_classifier(resolve_model_path(spec.path), len(label_names), spec.num_layers).to(ctx.device)
        io.save_state(ctx.out_dir / "features.safetensors",
                      {f"{s}_features{spec.frozen_layers}": frozen_features(
                          hf, tensors[f"{s}_ids"].to(ctx.device), tensors[f"{s}_mask"].to(ctx.device),
                          spec.frozen_layers).cpu().contiguous() for s in data})
    io.write_json(ctx.out_dir / "examples.json", {s: data[s][0][:20] for s in data})
    counts = {s: torch.bincount(tensors[f"{s}_labels"], minlength=len(label_names)).tolist() for s in data}
    meta = PreparedMeta(labels=label_names, counts=counts, seq_len=used, model=p.model)
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump(mode="json"))
    ctx.log_metrics({"seq_len": used, **{f"n_{s}": len(data[s][1]) for s in data}})
