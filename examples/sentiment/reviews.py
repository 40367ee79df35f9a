"""An offline stand-in for the DPO paper's controlled-sentiment task (IMDb + a sentiment classifier).

``make_review`` writes synthetic movie reviews: a neutral opening sentence (the prompt is a prefix of
it, so prompts carry no sentiment) followed by sentences whose adjectives and verbs are positive or
negative in proportion to a tone in [-1, 1]. ``sentiment`` is the ground-truth reward, a lexicon
classifier's probability that a review is positive; the policy never sees it, and the reward model
must learn it from preference pairs.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

LEXICON = {
    # positive
    "great": 1.0,
    "good": 0.6,
    "wonderful": 1.2,
    "excellent": 1.4,
    "amazing": 1.3,
    "brilliant": 1.3,
    "superb": 1.3,
    "fantastic": 1.3,
    "lovely": 1.0,
    "charming": 0.9,
    "moving": 0.8,
    "funny": 0.7,
    "loved": 1.2,
    "enjoyed": 1.0,
    "liked": 0.6,
    "recommend": 0.9,
    # negative
    "bad": -1.0,
    "poor": -0.8,
    "awful": -1.3,
    "terrible": -1.4,
    "boring": -1.1,
    "dull": -0.9,
    "horrible": -1.4,
    "weak": -0.7,
    "tedious": -1.0,
    "painful": -1.1,
    "silly": -0.6,
    "hated": -1.3,
    "disliked": -0.9,
    "avoid": -0.9,
}
POSITIVE_ADJ = [
    w
    for w in (
        "great",
        "good",
        "wonderful",
        "excellent",
        "amazing",
        "brilliant",
        "superb",
        "fantastic",
        "lovely",
        "charming",
        "moving",
        "funny",
    )
]
NEGATIVE_ADJ = [
    "bad",
    "poor",
    "awful",
    "terrible",
    "boring",
    "dull",
    "horrible",
    "weak",
    "tedious",
    "painful",
    "silly",
]
NEUTRAL_ADJ = ["long", "short", "quiet", "loud", "slow", "fast", "old", "new", "simple", "typical"]
VERBS = {1: ["loved", "enjoyed", "liked"], -1: ["hated", "disliked"], 0: ["watched", "saw"]}
SUBJECTS = [
    "the acting",
    "the story",
    "the music",
    "the ending",
    "the plot",
    "the cast",
    "the dialogue",
    "the photography",
    "the humor",
    "the script",
    "the camera work",
    "the lead actor",
]
TITLES = [
    "Silent River",
    "Last Train",
    "Hidden Garden",
    "Golden Summer",
    "Broken City",
    "Distant Road",
    "Red Island",
    "Secret Letter",
    "Frozen Mountain",
    "Little Star",
    "Midnight Window",
    "Northern Harbor",
]
OPENINGS = [
    "I watched {title} last night with my family",
    "We went to see {title} at the cinema on Sunday",
    "This film, {title}, came out last year",
    "My friend told me to watch {title} this week",
    "I saw {title} on a rainy evening at home",
    "The new movie {title} is about a small town",
]
_WORD = re.compile(r"[a-z]+")


def sentiment(text: str) -> float:
    """Ground-truth reward: p(positive) = sigmoid(sum of lexicon scores of the words in ``text``)."""
    total = sum(LEXICON.get(w, 0.0) for w in _WORD.findall(text.lower()))
    return 1.0 / (1.0 + math.exp(-total))


def sentiment_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """``sentiment`` of prompt + completion, as a reward function in TRL's convention (align_cli/rewards.py):
    the ground truth labels pairs directly, as in the DPO paper's sentiment experiment."""
    return [sentiment(f"{p}{c}") for p, c in zip(prompts, completions)]


def _adjective(rng: random.Random, tone: float) -> str:
    draw = rng.uniform(-1, 1)
    if draw < tone - 0.35:
        return rng.choice(POSITIVE_ADJ)
    if draw > tone + 0.35:
        return rng.choice(NEGATIVE_ADJ)
    return rng.choice(NEUTRAL_ADJ)


def _sentence(rng: random.Random, tone: float) -> str:
    kind = rng.random()
    if kind < 0.45:
        return f"{rng.choice(SUBJECTS).capitalize()} was {_adjective(rng, tone)}."
    if kind < 0.8:
        a, b = rng.sample(SUBJECTS, 2)
        return f"{a.capitalize()} was {_adjective(rng, tone)} and {b} was {_adjective(rng, tone)}."
    polarity = 1 if rng.uniform(-1, 1) < tone - 0.35 else (-1 if rng.uniform(-1, 1) > tone + 0.35 else 0)
    return f"I {rng.choice(VERBS[polarity])} it."


def make_opening(rng: random.Random) -> str:
    return rng.choice(OPENINGS).format(title=rng.choice(TITLES)) + "."


def make_review(rng: random.Random, tone: float, opening: str | None = None) -> str:
    """A neutral opening sentence, then 2-4 sentences whose sentiment follows ``tone`` in [-1, 1]."""
    opening = opening or make_opening(rng)
    return " ".join([opening, *(_sentence(rng, tone) for _ in range(rng.randint(2, 4)))])


def split_prompt(rng: random.Random, review: str, k: int | None = None) -> tuple[str, str]:
    """A prefix of k (2-8) words of the (neutral) opening as the prompt; the rest is the continuation."""
    opening_words = review.split(".")[0].split(" ")
    k = k or rng.randint(2, min(8, len(opening_words) - 1))
    words = review.split(" ")
    return " ".join(words[:k]), " " + " ".join(words[k:])
