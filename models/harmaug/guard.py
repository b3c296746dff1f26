"""Safety guards: sequence classifiers (teacher and student) and a Llama-Guard-style causal LM teacher,
the distillation loss, class-balanced sampling and P(unsafe) scoring.

A guard reads ``(prompt[, response])``: a classifier as a sentence pair, a causal LM guard as a chat
(user turn, then the assistant turn when there is a response) scored on its first generated token,
P(unsafe) = softmax over the logits of "safe" and "unsafe" (notes §6.2 step 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def classifier_from_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int,
                           intermediate: int, max_positions: int, pad_token_id: int):
    """A two-class ``BertForSequenceClassification`` or ``DebertaV2ForSequenceClassification``."""
    from transformers import (BertConfig, BertForSequenceClassification, DebertaV2Config,
                              DebertaV2ForSequenceClassification)

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=max_positions, num_labels=2,
                  pad_token_id=pad_token_id, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**common))
    if arch == "deberta_v2":
        cfg = DebertaV2Config(**common, relative_attention=True, position_buckets=32,
                              pos_att_type=["p2c", "c2p"], type_vocab_size=0)
        return DebertaV2ForSequenceClassification(cfg)
    raise ValueError(f"unknown classifier arch {arch!r} (bert or deberta_v2)")


def kd_loss(logits: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    """HarmAug's loss: ½ (CE(student, 1[p_T > 0.5]) + KL(t || s)), t = [1 - p_T, p_T], batch mean."""
    hard = (teacher_p > 0.5).long()
    target = torch.stack([1 - teacher_p, teacher_p], dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")
    return 0.5 * (F.cross_entropy(logits, hard) + kl)


def balanced_weights(hard_labels: np.ndarray) -> np.ndarray:
    """Per-example sampling weights 1 / (count of its class): both classes are drawn equally often."""
    hard_labels = np.asarray(hard_labels).astype(int)
    counts = np.bincount(hard_labels, minlength=2).astype(float)
    return 1.0 / np.maximum(counts, 1.0)[hard_labels]


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int):
    """Sentence pairs where there is a response, single sentences where there is none; padded to the
    batch's longest (the padding is trimmed per batch)."""
    pairs = [p if not r else (p, r) for p, r in zip(prompts, responses)]
    firsts = [x if isinstance(x, str) else x[0] for x in pairs]
    seconds = [None if isinstance(x, str) else x[1] for x in pairs]
    if all(s is None for s in seconds):
        return tokenizer(firsts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    encoded = [tokenizer(f, s, truncation=True, max_length=max_length) for f, s in zip(firsts, seconds)]
    return tokenizer.pad(encoded, return_tensors="pt")


@dataclass(frozen=True)
class KDConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    max_length: int


def _optimizer(model, lr: float, weight_decay: float):
    """AdamW without decay on biases and LayerNorm weights (the paper's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layernorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def train_guard(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], teacher_p: np.ndarray,
                cfg: KDConfig, generator: torch.Generator, device,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Distil: ``cfg.steps`` steps of :func:`kd_loss` on batches drawn by a class-balanced sampler
    (with replacement, so every variant takes the same number of steps whatever its data size)."""
    from transformers import get_linear_schedule_with_warmup

    model.to(device).train()
    opt = _optimizer(model, cfg.lr, cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    teacher_p = np.asarray(teacher_p, dtype=np.float32)
    weights = torch.tensor(balanced_weights(teacher_p > 0.5), dtype=torch.double)
    losses = []
    for step in range(cfg.steps):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=generator).tolist()
        batch = encode_pairs(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx],
                             cfg.max_length).to(device)
        target = torch.tensor(teacher_p[idx], device=device)
        loss = kd_loss(model(**batch).logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


class ClassifierGuard:
    """P(unsafe) = softmax(logits)[1] of a two-class sequence classifier."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    def encode(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> list:
        device = next(self.model.parameters()).device
        return [encode_pairs(self.tokenizer, prompts[s:s + batch_size], responses[s:s + batch_size],
                             self.max_length).to(device) for s in range(0, len(prompts), batch_size)]

    @torch.no_grad()
    def forward(self, batch) -> torch.Tensor:
        return torch.softmax(self.model(**batch).logits.float(), -1)[:, 1]

    def prob_unsafe(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> np.ndarray:
        return _probs(self, prompts, responses, batch_size)


def _probs(guard, prompts, responses, batch_size) -> np.ndarray:
    out = [guard.forward(b).cpu() for b in guard.encode(list(prompts), list(responses), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


class CausalLMGuard:
    """A Llama-Guard-style teacher: the chat (user prompt, assistant response when present) through the
    model's chat template plus ``suffix``; P(unsafe) from the next-token logits of "safe" and "unsafe"."""

    def __init__(self, model, tokenizer, safe_token: str, unsafe_token: str, suffix: str, max_length: int):
        self.model, self.tokenizer, self.suffix, self.max_length = model.eval(), tokenizer, suffix, max_length
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in (safe_token, unsafe_token)]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"'{safe_token}' and '{unsafe_token}' must each be one token of the guard's "
                             f"tokenizer, got ids {ids}")
        self.ids = [i[0] for i in ids]

    def chat(self, prompt: str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if response:
            messages.append({"role": "assistant", "content": response})
        return self.tokenizer.apply_chat_template(messages, tokenize=False) + self.suffix

    def encode(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> list:
        device = next(self.model.parameters()).device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        out = []
        for s in range(0, len(prompts), batch_size):
            texts = [self.chat(p, r) for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size])]
            out.append(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                      add_special_tokens=False, return_token_type_ids=False,
                                      return_tensors="pt").to(device))
        return out

    @torch.no_grad()
    def forward(self, batch) -> torch.Tensor:
        last = self.model(**batch).logits[:, -1, :].float()
        return torch.softmax(last[:, self.ids], -1)[:, 1]

    def prob_unsafe(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> np.ndarray:
        return _probs(self, prompts, responses, batch_size)


def forward_flops(guard, batches: list) -> int:
    """Floating-point operations of the guard's forward passes over ``batches`` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for b in batches:
            guard.forward(b)
    return int(counter.get_total_flops())


def time_forward(guards: dict, batches: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every guard's forward passes over its ``batches``, measured side by side in this
    process: one warm-up pass each, then ``repeats`` rounds with the order rotated every round."""
    import time

    names = list(guards)
    for n in names:
        for b in batches[n]:
            guards[n].forward(b)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for b in batches[n]:
                guards[n].forward(b)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - start)
    return times
