"""Language models of HarmAug: the word-level tokenizer, the tiny GPT-2 generator and response model
trained from scratch, chat prompts with and without the affirmative prefix, and KV-cached sampling.

At paper scale the same functions take any local causal LM and its tokenizer (its own chat template).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

SPECIAL = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "eos": "<eos>"}
ROLES = ("<user>", "<assistant>")
# the world's chat format: "<user> text <assistant>" (+ the assistant's text, then <eos> in training)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def word_tokenizer(words: Sequence[str]):
    """A whitespace word-level tokenizer (``tokenizers``) wrapped for transformers: [CLS] a [SEP] b [SEP]
    for guards (sentence pairs), the chat template and <eos> for the language models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), *ROLES, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = SPECIAL["cls"], SPECIAL["sep"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
                                  cls_token=cls, sep_token=sep, mask_token=SPECIAL["mask"],
                                  eos_token=SPECIAL["eos"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_prompt(tokenizer, user_text: str, prefix: str = "") -> str:
    """The user turn and the opened assistant turn, prefilled with ``prefix`` when given (HarmAug) and
    left empty for the no-prefix control."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)
    return f"{text} {prefix}" if prefix else text


def tiny_gpt2(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int


def train_lm(model, tokenizer, texts: Sequence[str], cfg: LMTrainConfig, generator: torch.Generator,
             device, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Next-token cross-entropy on ``texts`` (each ends with <eos>; pads masked), AdamW, linear warm-up
    and decay, gradient clipping at 1."""
    from transformers import get_linear_schedule_with_warmup

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    eos = tokenizer.eos_token
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(texts), (cfg.batch_size,), generator=generator).tolist()
        batch = tokenizer([f"{texts[i]} {eos}" for i in idx], padding=True, add_special_tokens=False,
                          return_token_type_ids=False, return_tensors="pt").to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
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


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, seed: int,
           device, temperature: float = 1.0, use_cache: bool = True) -> list[str]:
    """Continue every prompt by ancestral sampling (``generate``, KV cache on by default), in batches
    left-padded to the batch's own longest prompt; returns the continuations up to <eos>."""
    tokenizer.padding_side = "left"
    out: list[str] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), padding=True, add_special_tokens=False,
                          return_token_type_ids=False, return_tensors="pt").to(device)
        gen = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, use_cache=use_cache,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return out
