"""Generate the small synthetic example data sets in ``examples/data/``.

Every data set follows simple, known rules so that a ~1M-parameter model can learn them in a few hundred
steps and tests can check what was learned:

* ``alpaca.jsonl``: Alpaca ``instruction``/``input``/``output`` records (repeat, uppercase, opposites,
  colors, counting, list reversal, small arithmetic, review sentiment).
* ``chat.jsonl``: ``{"messages": [...]}`` conversations with the same tasks.
* ``prompt_completion.jsonl``: ``{"prompt", "completion"}`` pairs with the same tasks.
* ``prefs.jsonl``: ``{"prompt", "chosen", "rejected", "margin"}`` movie-review preferences. The rule:
  ``positivity(chosen) > positivity(rejected)``, and ``margin`` (0, 1/3, 2/3 or 1) grows with the gap.
* ``ranked.jsonl``: ``{"prompt", "responses"}`` with 3 to 5 reviews, best first by ``positivity``.
* ``prompts.jsonl``: ``{"prompt"}`` review prompts to sample from (e.g. PPO with ``positivity`` as reward).

``positivity(text)`` is the ground-truth reward: (positive words - negative words) / 3, clipped to [-1, 1].

Usage::

    python examples/make_data.py [--out examples/data] [--seed 0] [--corpus align_cli/assets/corpus.txt]

``--corpus`` also writes the tokenizer training corpus (same generators, another seed, more text).
The output is a pure function of the arguments.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

# --------------------------------------------------------------------------------------------------------
# Sentiment vocabulary and the ground-truth reward
# --------------------------------------------------------------------------------------------------------

POSITIVE_ADJ = (
    "great",
    "wonderful",
    "excellent",
    "amazing",
    "brilliant",
    "superb",
    "fantastic",
    "delightful",
    "lovely",
    "charming",
)
NEGATIVE_ADJ = (
    "awful",
    "boring",
    "terrible",
    "dull",
    "horrible",
    "poor",
    "bad",
    "weak",
    "tedious",
    "painful",
)
NEUTRAL_ADJ = ("okay", "average", "ordinary", "plain", "typical", "simple")
POSITIVE_VERB = ("loved", "enjoyed", "liked")
NEGATIVE_VERB = ("hated", "disliked")
NEUTRAL_VERB = ("watched", "saw")

POSITIVE_WORDS = frozenset(POSITIVE_ADJ + POSITIVE_VERB)
NEGATIVE_WORDS = frozenset(NEGATIVE_ADJ + NEGATIVE_VERB)

_WORD_RE = re.compile(r"[a-z]+")


def sentiment_counts(text: str) -> tuple[int, int]:
    """(#positive, #negative) sentiment words in ``text``, matched case-insensitively as whole words."""
    words = _WORD_RE.findall(text.lower())
    return sum(w in POSITIVE_WORDS for w in words), sum(w in NEGATIVE_WORDS for w in words)


def positivity(text: str) -> float:
    """Ground-truth reward: (#positive - #negative sentiment words) / 3, clipped to [-1, 1].

    Every generated review has exactly three sentiment slots, so its positivity is one of
    -1, -2/3, -1/3, 0, 1/3, 2/3, 1.
    """
    pos, neg = sentiment_counts(text)
    return max(-1.0, min(1.0, (pos - neg) / 3))


def dominates(better: str, worse: str) -> bool:
    """``better`` has at least as many positive and at most as many negative words, and is more positive."""
    (pb, nb), (pw, nw) = sentiment_counts(better), sentiment_counts(worse)
    return pb >= pw and nb <= nw and pb - nb > pw - nw


# Review templates: three sentiment slots each, "a" = adjective, "v" = verb.
REVIEW_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("The acting was {}, the story was {} and the ending was {}.", "aaa"),
    ("I {} this movie. The music was {} and the cast was {}.", "vaa"),
    ("The plot was {}. The characters were {}, and the dialogue was {}.", "aaa"),
    ("I {} it: the scenes were {} and the songs were {}.", "vaa"),
    ("The film felt {}, the jokes were {} and the actors were {}.", "aaa"),
    ("The story was {} and the pictures were {}. I {} it.", "aav"),
    ("Overall the movie was {}, the music was {} and the ending was {}.", "aaa"),
)
TITLE_FIRST = (
    "Silent",
    "Last",
    "Hidden",
    "Golden",
    "Broken",
    "Distant",
    "Red",
    "Secret",
    "Frozen",
    "Little",
    "Midnight",
    "Northern",
)
TITLE_SECOND = (
    "River",
    "Train",
    "Garden",
    "Summer",
    "City",
    "Road",
    "Island",
    "Letter",
    "Mountain",
    "Star",
    "Window",
    "Harbor",
)
PROMPT_TEMPLATES = (
    "Review of the movie {}:\n",
    "Write a short review of {}.\n",
    "What did you think of {}?\n",
)
PROMPT_STARTERS = ("", "", "The acting was", "I", "The story was", "The film felt", "Overall the movie was")


def _slot_word(rng: random.Random, kind: str, sentiment: int) -> str:
    if kind == "v":
        pools = {1: POSITIVE_VERB, -1: NEGATIVE_VERB, 0: NEUTRAL_VERB}
    else:
        pools = {1: POSITIVE_ADJ, -1: NEGATIVE_ADJ, 0: NEUTRAL_ADJ}
    return rng.choice(pools[sentiment])


def make_review(rng: random.Random, score: int) -> str:
    """A review with three sentiment slots whose (#positive - #negative) equals ``score`` (-3..3)."""
    if not -3 <= score <= 3:
        raise ValueError(f"score must be in -3..3, got {score}")
    splits = [(p, n) for p in range(4) for n in range(4) if p + n <= 3 and p - n == score]
    p, n = rng.choice(splits)
    slots = [1] * p + [-1] * n + [0] * (3 - p - n)
    rng.shuffle(slots)
    template, kinds = rng.choice(REVIEW_TEMPLATES)
    text = template.format(*(_slot_word(rng, k, s) for k, s in zip(kinds, slots, strict=True)))
    return text[0].upper() + text[1:]


def make_title(rng: random.Random) -> str:
    return f"{rng.choice(('The ', '', ''))}{rng.choice(TITLE_FIRST)} {rng.choice(TITLE_SECOND)}"


def make_review_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(make_title(rng))


# --------------------------------------------------------------------------------------------------------
# Instruction tasks: each returns (instruction, input, output)
# --------------------------------------------------------------------------------------------------------

NOUNS = (
    "apple",
    "banana",
    "cat",
    "dog",
    "house",
    "tree",
    "book",
    "chair",
    "river",
    "bird",
    "car",
    "cup",
    "fish",
    "moon",
    "sun",
    "star",
    "table",
    "door",
    "shoe",
    "hat",
    "ball",
    "boat",
    "train",
    "cake",
    "milk",
    "bread",
    "egg",
    "lamp",
    "pen",
    "box",
)
COLORS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "banana": "yellow",
    "tomato": "red",
    "carrot": "orange",
    "milk": "white",
    "leaf": "green",
    "lemon": "yellow",
    "sea": "blue",
    "strawberry": "red",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "day": "night",
    "old": "new",
    "open": "closed",
    "happy": "sad",
    "light": "dark",
    "tall": "short",
    "wet": "dry",
    "early": "late",
    "full": "empty",
    "left": "right",
    "hard": "soft",
    "loud": "quiet",
    "push": "pull",
    "first": "last",
}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})

Task = tuple[str, str, str]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(NOUNS) for _ in range(rng.randint(lo, hi))]


def task_repeat(rng: random.Random) -> Task:
    word = rng.choice(NOUNS)
    instr = rng.choice(("Repeat the word.", "Say the word twice.", "Write the word two times."))
    return instr, word, f"{word} {word}"


def task_uppercase(rng: random.Random) -> Task:
    text = " ".join(_words(rng, 1, 3))
    instr = rng.choice(
        ("Uppercase the input.", "Write the input in capital letters.", "Convert the text to upper case.")
    )
    return instr, text, text.upper()


def task_opposite(rng: random.Random) -> Task:
    word = rng.choice(sorted(OPPOSITES))
    if rng.random() < 0.3:
        return (
            rng.choice(("Give the opposite of the word.", "Write the opposite word.")),
            word,
            OPPOSITES[word],
        )
    instr = rng.choice(
        ("What is the opposite of {}?", "Give the opposite of {}.", "Name the opposite of the word {}.")
    )
    return instr.format(word), "", OPPOSITES[word]


def task_color(rng: random.Random) -> Task:
    thing = rng.choice(sorted(COLORS))
    instr = rng.choice(("Name the color of the {}.", "What color is the {}?", "What is the color of the {}?"))
    return instr.format(thing), "", COLORS[thing]


def task_count_words(rng: random.Random) -> Task:
    words = _words(rng, 1, 6)
    instr = rng.choice(("Count the words in the input.", "How many words are in the input?"))
    return instr, " ".join(words), str(len(words))


def task_count_up(rng: random.Random) -> Task:
    n = rng.randint(2, 9)
    instr = rng.choice(("Count from 1 to {}.", "List the numbers from 1 to {}."))
    return instr.format(n), "", " ".join(str(i) for i in range(1, n + 1))


def task_reverse(rng: random.Random) -> Task:
    words = rng.sample(NOUNS, rng.randint(2, 4))
    instr = rng.choice(("Reverse the list.", "Write the words in reverse order."))
    return instr, ", ".join(words), ", ".join(reversed(words))


def task_first_word(rng: random.Random) -> Task:
    words = _words(rng, 2, 5)
    if rng.random() < 0.5:
        return (
            rng.choice(("What is the first word of the input?", "Give the first word.")),
            " ".join(words),
            words[0],
        )
    return (
        rng.choice(("What is the last word of the input?", "Give the last word.")),
        " ".join(words),
        words[-1],
    )


def task_arithmetic(rng: random.Random) -> Task:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.6:
        instr = rng.choice(("What is {} plus {}?", "Add {} and {}.", "Compute {} + {}."))
        return instr.format(a, b), "", str(a + b)
    a, b = max(a, b), min(a, b)
    instr = rng.choice(("What is {} minus {}?", "Subtract {1} from {0}.", "Compute {} - {}."))
    return instr.format(a, b), "", str(a - b)


def task_sentiment(rng: random.Random) -> Task:
    score = rng.choice((-3, -2, -1, 1, 2, 3))
    instr = rng.choice(("Is this review positive or negative?", "Classify the sentiment of the review."))
    return instr, make_review(rng, score), "positive" if score > 0 else "negative"


TASKS: tuple[Callable[[random.Random], Task], ...] = (
    task_repeat,
    task_uppercase,
    task_opposite,
    task_color,
    task_count_words,
    task_count_up,
    task_reverse,
    task_first_word,
    task_arithmetic,
    task_sentiment,
)


def make_task(rng: random.Random) -> Task:
    return rng.choice(TASKS)(rng)


def _unique(rng: random.Random, n: int, make: Callable[[random.Random], object]) -> list:
    """``n`` distinct items from ``make`` (falls back to duplicates only if it cannot find new ones)."""
    seen: set[str] = set()
    out: list = []
    tries = 0
    while len(out) < n:
        item = make(rng)
        key = json.dumps(item, sort_keys=True)
        tries += 1
        if key in seen and tries < 50 * n:
            continue
        seen.add(key)
        out.append(item)
    return out


def _user_text(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp else instruction


SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.")


# --------------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------------


def make_alpaca(rng: random.Random, n: int = 600) -> list[dict]:
    def one(r: random.Random) -> dict:
        instruction, inp, output = make_task(r)
        return {"instruction": instruction, "input": inp, "output": output}

    return _unique(rng, n, one)


def make_chat(rng: random.Random, n: int = 200) -> list[dict]:
    def one(r: random.Random) -> dict:
        messages = []
        if r.random() < 0.5:
            messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        for _ in range(r.randint(1, 2)):
            instruction, inp, output = make_task(r)
            messages.append({"role": "user", "content": _user_text(instruction, inp)})
            messages.append({"role": "assistant", "content": output})
        return {"messages": messages}

    return _unique(rng, n, one)


def make_prompt_completion(rng: random.Random, n: int = 200) -> list[dict]:
    def one(r: random.Random) -> dict:
        instruction, inp, output = make_task(r)
        prompt = f"Question: {instruction}\n" + (f"Input: {inp}\n" if inp else "") + "Answer:"
        return {"prompt": prompt, "completion": f" {output}"}

    return _unique(rng, n, one)


def margin_for_gap(gap: int) -> float:
    """Rating strength for a positivity gap of ``gap`` words (1..6): 0, 1/3, 2/3 or 1 (Llama-2 style)."""
    return min(gap - 1, 3) / 3


def _ranked_reviews(rng: random.Random, scores: list[int]) -> list[str]:
    """Reviews with the given decreasing scores, each one dominating the next (see ``dominates``)."""
    while True:
        reviews = [make_review(rng, s) for s in scores]
        if all(dominates(a, b) for a, b in zip(reviews, reviews[1:], strict=False)):
            return reviews


def make_prefs(rng: random.Random, n: int = 600) -> list[dict]:
    def one(r: random.Random) -> dict:
        level = r.randint(0, 3)
        gap = level + 1 if level < 3 else r.randint(4, 6)
        rejected_score = r.randint(-3, 3 - gap)
        prompt = make_review_prompt(r)
        chosen, rejected = _ranked_reviews(r, [rejected_score + gap, rejected_score])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin_for_gap(gap)}

    return _unique(rng, n, one)


def make_ranked(rng: random.Random, n: int = 150) -> list[dict]:
    def one(r: random.Random) -> dict:
        scores = sorted(r.sample(range(-3, 4), r.randint(3, 5)), reverse=True)
        return {"prompt": make_review_prompt(r), "responses": _ranked_reviews(r, scores)}

    return _unique(rng, n, one)


def make_prompts(rng: random.Random, n: int = 100) -> list[dict]:
    def one(r: random.Random) -> dict:
        return {"prompt": make_review_prompt(r) + r.choice(PROMPT_STARTERS)}

    return _unique(rng, n, one)


DATASETS: dict[str, Callable[[random.Random], list[dict]]] = {
    "alpaca": make_alpaca,
    "chat": make_chat,
    "prompt_completion": make_prompt_completion,
    "prefs": make_prefs,
    "ranked": make_ranked,
    "prompts": make_prompts,
}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_datasets(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write every data set as ``out/<name>.jsonl``; each gets its own RNG derived from ``seed``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, make) in enumerate(DATASETS.items()):
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], make(random.Random(seed * 1000 + i)))
    return paths


# --------------------------------------------------------------------------------------------------------
# Tokenizer training corpus (align_cli/assets/corpus.txt)
# --------------------------------------------------------------------------------------------------------

# Broader everyday English for the corpus, so the tokenizer also handles text beyond the example tasks.
CORPUS_NOUNS = """
time year people way day man woman child world life hand part eye place week case point number group
problem fact water money story month lot right study book job word business issue side kind head house
service friend father mother power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art war history
party result change morning reason research girl guy moment air teacher force education food country
student family school program question government system night mind garden window kitchen letter music
picture paper table bed street village island forest field road bridge train ship plane horse animal
flower river mountain beach ocean weather rain wind cloud summer winter spring autumn holiday birthday
dinner lunch breakfast coffee tea sugar salt soup rice fruit vegetable market shop price store computer
phone screen message email website keyboard language sentence answer example list task response request
instruction input output report lesson exam doctor nurse hospital medicine farmer engineer artist writer
singer player driver king queen prince dragon castle journey adventure secret dream memory future past
""".split()
CORPUS_VERBS = """
walked talked played worked looked asked called tried needed wanted helped opened started turned showed
moved lived believed brought happened wrote provided sat stood lost paid met included continued learned
changed led understood watched followed stopped created spoke read spent grew offered remembered considered
appeared bought waited served died sent expected built stayed fell cut reached killed remained suggested
raised passed sold required decided returned explained hoped developed carried broke received agreed
supported picked wore chose cleaned cooked painted visited answered counted finished listened laughed
smiled cried danced jumped climbed swam traveled planted repaired discovered explored noticed described
""".split()
CORPUS_ADJECTIVES = """
new good first last long little own other old right big high different small large next early young
important few public bad same able late hard major better free true whole clear recent certain personal
open red difficult available likely short single medical current wrong private past foreign fine common
poor natural significant similar hot dead central happy serious ready simple left physical general
environmental financial blue democratic dark various entire close legal religious cold final main green
nice huge popular traditional cultural quick quiet bright clever gentle brave busy warm heavy empty rich
strange careful honest modern ancient tiny wide narrow soft loud sweet bitter fresh clean dirty friendly
""".split()
CORPUS_ADVERBS = """
quickly slowly carefully quietly happily sadly easily suddenly finally usually often always never sometimes
really almost already together however therefore probably certainly clearly simply nearly exactly
""".split()
CORPUS_NAMES = """
Anna Ben Carla David Emma Frank Grace Henry Isabel Jack Laura Michael Nora Oliver Paul Rosa Sam Tom Victor
""".split()
CORPUS_PLACES = """
at home|in the morning|every day|with a smile|near the river|after school|before dinner|in the city
|on the weekend|at night|in the garden|by the sea|in the old house|during the summer|last year
""".replace("\n", "").split("|")


def _generic_sentence(rng: random.Random) -> str:
    noun, noun2 = rng.choice(CORPUS_NOUNS), rng.choice(CORPUS_NOUNS)
    adj, verb, adv = rng.choice(CORPUS_ADJECTIVES), rng.choice(CORPUS_VERBS), rng.choice(CORPUS_ADVERBS)
    name, place, noun3 = rng.choice(CORPUS_NAMES), rng.choice(CORPUS_PLACES), rng.choice(NOUNS)
    forms = (
        f"{name} {verb} the {adj} {noun} {place}.",
        f"The {noun} {verb} {adv} {place}.",
        f"{name} and the {noun} {adv} {verb} the {noun2}.",
        f"Why is the {noun} so {adj}? Because the {noun2} {verb} {place}.",
        f"It was a {adj} {noun}, and {name} {verb} it {adv}.",
        f"Every {noun} has {adj} {noun2}s.",
        f'{name} said: "The {noun} is {adj} {place}."',
        f"There are {rng.randint(2, 99)} {noun}s and {rng.randint(2, 99)} {noun2}s in the {noun3}.",
    )
    return rng.choice(forms)


WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CORPUS_SEPARATOR = "\n\n\n"


def make_corpus(seed: int = 12345) -> str:
    """Plain English-like text covering the example data: tasks, chats, reviews, numbers, lists.

    Documents are separated by ``CORPUS_SEPARATOR`` (three newlines); none contains it.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for i in range(1000):
        instruction, inp, output = make_task(rng)
        if i % 8 == 0:
            docs.append((WITH_INPUT if inp else NO_INPUT).format(instruction=instruction, input=inp) + output)
        elif i % 8 == 1:
            docs.append(f"<|user|>\n{_user_text(instruction, inp)}<|end|>\n<|assistant|>\n{output}<|end|>")
        else:
            docs.append(
                f"Question: {instruction}\n" + (f"Input: {inp}\n" if inp else "") + f"Answer: {output}"
            )
    for _ in range(600):
        docs.append(make_review_prompt(rng) + make_review(rng, rng.randint(-3, 3)))
    for _ in range(900):
        docs.append(" ".join(_generic_sentence(rng) for _ in range(rng.randint(1, 4))))
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        docs.append(f"{a} + {b} = {a + b}. {max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}.")
    for _ in range(100):
        items = rng.sample(NOUNS, rng.randint(2, 5))
        docs.append("\n".join(f"{j}. {w}" for j, w in enumerate(items, 1)) + "\n- " + "\n- ".join(items))
    docs.append(" ".join(str(i) for i in range(1001)))
    rng.shuffle(docs)
    assert all(doc == doc.strip("\n") and CORPUS_SEPARATOR not in doc for doc in docs)
    return CORPUS_SEPARATOR.join(docs) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--corpus", type=Path, default=None, help="also write the tokenizer corpus here")
    args = parser.parse_args(argv)
    for name, path in write_datasets(args.out, args.seed).items():
        n_records = len(path.read_text(encoding="utf-8").splitlines())
        print(f"{name:>18}: {n_records:4d} records, {path.stat().st_size:7d} B")
    if args.corpus is not None:
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        args.corpus.write_text(make_corpus(), encoding="utf-8", newline="\n")
        print(f"{'corpus':>18}: {args.corpus.stat().st_size:7d} B -> {args.corpus}")


if __name__ == "__main__":
    main()
