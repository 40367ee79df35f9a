"""Test hook: inject a fault at a named point of a run, so the reliability tests can kill or signal a
run at an exact place instead of racing a timer. Read here and nowhere else; never set in real runs.

    ALIGN_FAULT="ACTION:POINT=STEP[,ACTION:POINT=STEP...]"

ACTION is ``kill`` (SIGKILL: the process dies at once, like an OOM kill or a lost node), ``sigterm``
or ``sigint`` (sent to the process itself; the run's handler only sets a flag). POINT is where, during
optimizer step (PPO: iteration) STEP, counted from 1:

- ``data``: the step's micro-batches were just loaded, before the forward pass;
- ``step``: after the first backward pass of the step, before the optimizer update;
- ``eval``: after the first batch of the evaluation run at that step;
- ``save``: while the checkpoint of that step is being written (files in ``checkpoint-N.tmp``, no
  ``trainer_state.json`` yet, not renamed).
"""

from __future__ import annotations

import os
import signal

ENV = "ALIGN_FAULT"
_ACTIONS = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


def fault_point(point: str, step: int) -> None:
    """Fire the fault named for ``point`` at ``step``, if the test hook asks for one."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        action, _, where = item.strip().partition(":")
        name, _, at = where.partition("=")
        if name == point and at.strip() == str(step) and action in _ACTIONS:
            os.kill(os.getpid(), _ACTIONS[action])
