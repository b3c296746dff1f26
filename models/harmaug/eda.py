"""EDA (Wei & Zou 2019), the augmentation baseline: synonym replacement, random insertion, random swap
and random deletion, each changing n = max(1, alpha * words) words of a sentence."""
from __future__ import annotations

import numpy as np

OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


def synonym_replacement(words: list[str], n: int, synonyms: dict, rng: np.random.Generator) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(out) if synonyms.get(w)]
    for i in rng.permutation(candidates)[:n]:
        choices = synonyms[out[i]]
        out[i] = choices[rng.integers(len(choices))]
    return out


def random_insertion(words: list[str], n: int, synonyms: dict, rng: np.random.Generator) -> list[str]:
    """Insert a synonym of a random word at a random place (a copy of a word where none has synonyms)."""
    out = list(words)
    for _ in range(n):
        word = out[rng.integers(len(out))]
        choices = synonyms.get(word) or [word]
        out.insert(int(rng.integers(len(out) + 1)), choices[rng.integers(len(choices))])
    return out


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    out = list(words)
    for _ in range(n):
        i, j = rng.integers(len(out), size=2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    keep = [w for w in words if rng.random() > p]
    return keep or [words[rng.integers(len(words))]]


def eda(sentence: str, alpha: float, synonyms: dict, rng: np.random.Generator) -> str:
    """One augmented sentence by one randomly chosen EDA operation."""
    words = sentence.split()
    if not words:
        return sentence
    n = max(1, int(alpha * len(words)))
    op = OPERATIONS[rng.integers(len(OPERATIONS))]
    if op == "synonym_replacement":
        words = synonym_replacement(words, n, synonyms, rng)
    elif op == "random_insertion":
        words = random_insertion(words, n, synonyms, rng)
    elif op == "random_swap":
        words = random_swap(words, n, rng)
    else:
        words = random_deletion(words, alpha, rng)
    return " ".join(words)
