"""The CPU-scale data set of bo_fusion: an offline, imbalanced 3-class sentiment task of templated English
reviews (built by the prepare stage).

Why it is built this way (the paper's motivation is that loss and metric disagree):
* classes negative / neutral / positive with a skewed prior (default 0.28 / 0.60 / 0.12), scored by
  macro-F1, so the rare positive class weighs as much in the metric as it weighs little in the loss;
* the label is the polarity of the *main* clause: "X but Y" and "although X, Y" take Y, "Y even though X"
  takes Y as well (main clause first), so word counting is not enough;
* "not" / "never" flip a polar adjective (neutral stays neutral), "hardly" weakens it to neutral;
* a share of the polar adjectives (default 35%) appears only in validation and test, so the model must
  rely on what the pretrained encoder knows about those words;
* training labels are flipped to another class with a probability (default 20%); val and test are clean.
Sentences are short (at most ~20 word pieces with MiniLM's tokenizer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

POSITIVE = (
    "good great excellent wonderful superb delightful pleasant lovely fantastic brilliant charming "
    "impressive outstanding enjoyable marvelous splendid terrific amazing fabulous admirable elegant "
    "gorgeous perfect remarkable satisfying stunning tasty reliable friendly beautiful"
).split()
NEGATIVE = (
    "bad awful terrible horrible dreadful poor nasty boring disappointing mediocre unpleasant "
    "disgusting miserable lousy pathetic annoying clumsy dull broken rude painful shoddy sloppy "
    "tedious ugly useless weak filthy bland noisy"
).split()
NEUTRAL = (
    "ordinary typical standard average usual normal plain modest common regular simple basic "
    "familiar routine conventional moderate predictable quiet small large"
).split()
NOUNS = (
    "movie film meal dinner hotel room service staff phone camera book novel concert show album "
    "restaurant waiter car trip flight seat menu coffee pizza game laptop screen keyboard museum "
    "lecture course hospital doctor shop garden beach apartment kitchen bus ticket song"
).split()
INTENSIFIERS = ("", "", "", "very ", "really ", "quite ", "rather ", "truly ")
NEGATORS = ("not ", "never ")
VERBS = ("was", "is", "seemed", "felt", "looked")

LABELS = ("negative", "neutral", "positive")


@dataclass
class Split:
    texts: list[str]
    labels: list[int]


def _negator(rng: random.Random, verb: str) -> str:
    return rng.choice(NEGATORS) if verb in ("was", "is") else "not "


def _clause(rng: random.Random, polarity: int, adjectives: dict[int, list[str]]) -> str:
    """A clause whose sentiment is `polarity` (0 neg, 1 neutral, 2 pos)."""
    noun, verb = rng.choice(NOUNS), rng.choice(VERBS)
    mode = rng.random()
    if polarity == 1 and mode < 0.25:  # "hardly <polar>" reads as neutral
        adj = rng.choice(adjectives[rng.choice((0, 2))])
        return f"the {noun} {verb} hardly {adj}"
    if polarity != 1 and mode < 0.35:  # negated opposite polarity
        adj = rng.choice(adjectives[2 - polarity])
        return f"the {noun} {verb} {_negator(rng, verb)}{adj}"
    if polarity == 1 and mode < 0.4:
        adj = rng.choice(adjectives[1])
        return f"the {noun} {verb} {_negator(rng, verb)}{adj}"
    return f"the {noun} {verb} {rng.choice(INTENSIFIERS)}{rng.choice(adjectives[polarity])}"


def _sentence(rng: random.Random, label: int, adjectives: dict[int, list[str]]) -> str:
    main = _clause(rng, label, adjectives)
    shape = rng.random()
    if shape < 0.3:
        return main
    other = _clause(rng, rng.choice((0, 1, 2)), adjectives)
    if shape < 0.6:
        return f"{other} but {main}"
    if shape < 0.8:
        return f"although {other}, {main}"
    return f"{main} even though {other}"


def build_templated_sentiment(
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    class_prior: tuple[float, float, float] = (0.28, 0.60, 0.12),
    heldout_fraction: float = 0.35,
    label_noise: float = 0.2,
    seed: int = 0,
) -> dict[str, Split]:
    """Train / val / test splits; held-out adjectives appear only in val and test."""
    if min(n_train, n_val, n_test) <= 0:
        raise ValueError("every split needs at least one example")
    if len(class_prior) != 3 or min(class_prior) <= 0:
        raise ValueError("class_prior needs three positive numbers")
    if not 0 <= heldout_fraction < 1 or not 0 <= label_noise < 1:
        raise ValueError("heldout_fraction and label_noise must lie in [0, 1)")
    rng = random.Random(seed)
    seen: dict[int, list[str]] = {}
    everything: dict[int, list[str]] = {}
    for cls, words in ((0, NEGATIVE), (1, NEUTRAL), (2, POSITIVE)):
        words = list(words)
        rng.shuffle(words)
        n_held = int(round(heldout_fraction * len(words))) if cls != 1 else 0
        seen[cls] = words[n_held:]
        everything[cls] = words
    total = sum(class_prior)
    prior = [p / total for p in class_prior]

    def draw(n: int, adjectives: dict[int, list[str]], noise: float) -> Split:
        texts, labels = [], []
        for _ in range(n):
            y = rng.choices((0, 1, 2), weights=prior)[0]
            texts.append(_sentence(rng, y, adjectives))
            if rng.random() < noise:
                y = rng.choice([c for c in (0, 1, 2) if c != y])
            labels.append(y)
        return Split(texts, labels)

    return {
        "train": draw(n_train, seen, label_noise),
        "val": draw(n_val, everything, 0.0),
        "test": draw(n_test, everything, 0.0),
    }
