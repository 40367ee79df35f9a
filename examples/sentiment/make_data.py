"""Write the sentiment task's data sets (deterministic for a seed) into examples/sentiment/data/.

  sft.jsonl          prompt/completion: review prefixes and their continuations, tones uniform in [-1, 1]
  prefs.jsonl        the same prefix with two continuations; chosen = the one the ground truth prefers
  prompts.jsonl      training prompts for PPO / best-of-N
  prompts_eval.jsonl held-out prompts for `align eval` / `align frontier`

Usage: python examples/sentiment/make_data.py [--out examples/sentiment/data] [--seed 0] [--reviews 3000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reviews import make_opening, make_review, sentiment, split_prompt  # noqa: E402


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reviews", type=int, default=3000)
    parser.add_argument("--pairs", type=int, default=2000)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sft = []
    for _ in range(args.reviews):
        prompt, completion = split_prompt(rng, make_review(rng, rng.uniform(-1, 1)))
        sft.append({"prompt": prompt, "completion": completion})
    prefs = []
    while len(prefs) < args.pairs:
        opening = make_opening(rng)
        k = rng.randint(2, min(8, len(opening.split(" ")) - 1))
        # two continuations of the same prefix, with independent tones
        (prompt, a), (_, b) = (
            split_prompt(rng, make_review(rng, rng.uniform(-1, 1), opening), k) for _ in range(2)
        )
        sa, sb = sentiment(a), sentiment(b)
        if a == b or abs(sa - sb) < 0.05:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompts = [{"prompt": split_prompt(rng, make_review(rng, 0.0))[0]} for _ in range(256)]
    held = [{"prompt": split_prompt(rng, make_review(rng, 0.0))[0]} for _ in range(64)]
    write(args.out / "sft.jsonl", sft)
    write(args.out / "prefs.jsonl", prefs)
    write(args.out / "prompts.jsonl", prompts)
    write(args.out / "prompts_eval.jsonl", held)
    counts = f"{len(sft)} reviews, {len(prefs)} preference pairs, {len(prompts)} + {len(held)} prompts"
    print(f"wrote {counts} to {args.out}")


if __name__ == "__main__":
    main()
