"""The parity task's reward, in TRL's reward-function convention (``align_cli/rewards.py``).

``rejection.reward_functions: [examples/verifiable/rewards.py:right_parity]``
"""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+")


def right_parity(
    completions: list[Any], parity: list[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion's first whole number has the parity its prompt asks for (the prompt's
    `parity` column: "even" or "odd"), else 0.0.

    A completion without a number gets 0.0: no answer is a wrong answer, and None would leave the sample
    without any reward. None is for a prompt that asks for no parity (no `parity` column): another
    function's task."""
    asked = parity if parity is not None else [None] * len(completions)
    rewards: list[float | None] = []
    for completion, wanted in zip(completions, asked):
        if wanted is None:
            rewards.append(None)
            continue
        text = completion[-1]["content"] if isinstance(completion, list) else completion  # chat or text
        number = NUMBER.search(text)
        odd = number is not None and int(number.group()[-1]) % 2 == 1  # the last digit decides
        rewards.append(float(number is not None and odd == (wanted == "odd")))
    return rewards
