"""Write the verifiable parity task (deterministic for a seed) into examples/verifiable/data/.

Each prompt asks for an even or an odd number and carries the asked parity in a `parity` column, which
reward functions receive by name (``rewards.py:right_parity``); no reward model is needed.

  train.jsonl    training prompts (rejection sampling, on-policy training)
  heldout.jsonl  held-out prompts: none of them is in train.jsonl
  sft.jsonl      prompt/completion: each prompt answered with a random number, of the right parity half
                 the time, to teach a starting policy to answer with a number at all

Usage: python examples/verifiable/make_prompts.py [--out examples/verifiable/data] [--seed 0] [--heldout 64]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PARITIES = ("even", "odd")
PHRASES = (
    "Write a number that is {parity}:",
    "Write an {parity} number:",
    "Give me an {parity} number:",
    "Name a number that is {parity}:",
    "Think of an {parity} number and write it down:",
    "Reply with one {parity} number:",
)
RANGED = "Write an {parity} number between {low} and {high}:"


def all_prompts() -> list[dict[str, str]]:
    """Every distinct prompt of the task, each with its parity."""
    rows = [{"prompt": p.format(parity=parity), "parity": parity} for p in PHRASES for parity in PARITIES]
    for low in range(0, 100, 5):
        for width in (10, 20, 50, 100):
            for parity in PARITIES:
                rows.append(
                    {"prompt": RANGED.format(parity=parity, low=low, high=low + width), "parity": parity}
                )
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=64, help="held-out prompts (the rest are training)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = all_prompts()
    rng.shuffle(rows)
    heldout, train = rows[: args.heldout], rows[args.heldout :]
    sft = [{"prompt": r["prompt"], "completion": f" {rng.randint(0, 99)}"} for r in train for _ in range(2)]
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.jsonl", train)
    write(args.out / "heldout.jsonl", heldout)
    write(args.out / "sft.jsonl", sft)
    print(
        f"wrote {len(train)} training and {len(heldout)} held-out prompts, {len(sft)} SFT records: {args.out}"
    )


if __name__ == "__main__":
    main()
