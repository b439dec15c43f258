"""Failpoints: stop a run at an exact step, so that tests (and users reproducing a report) need not race it.

A test that wants "Ctrl-C after the second journal chunk is on disk" used to poll the folder and then signal the
process; a run that finished the remaining chunks between two polls made the test fail for reasons that had nothing to
do with featx. Instead, featx names the steps where an interruption matters and a caller arms them through one
environment variable, read only here::

    FEATX_FAILPOINTS="journal.chunk_written=2:SIGINT,finetune.checkpoint_saved=1:SIGKILL"

``name=N:ACTION`` fires on the N-th time (1-based, per process) the step is reached; ``ACTION`` is a signal name the
process sends itself (``SIGINT``, ``SIGTERM``, ``SIGKILL``, ...), so the run goes through exactly the handling a real
signal gets. Unset (the default), :func:`hit` is a dictionary lookup and nothing else. The steps featx names:

- ``journal.chunk_written``: a journal chunk is durable (renamed and its folder fsynced);
- ``finetune.checkpoint_saved``: a fine-tuning checkpoint (any stage) is durable.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

ENV = "FEATX_FAILPOINTS"
STEPS = ("journal.chunk_written", "finetune.checkpoint_saved")

_lock = threading.Lock()
_armed: tuple[str, dict[str, tuple[int, signal.Signals]]] = ("", {})
_counts: Counter[str] = Counter()


def _parse(text: str) -> dict[str, tuple[int, signal.Signals]]:
    points: dict[str, tuple[int, signal.Signals]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, rest = item.partition("=")
        count, sep2, action = rest.partition(":")
        if not sep or not sep2 or name not in STEPS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}: bad failpoint {item!r} (expected NAME=N:SIGNAL with NAME one of {', '.join(STEPS)})")
        try:
            points[name] = (int(count), signal.Signals[action.upper()])
        except KeyError:
            raise ValueError(f"{ENV}: unknown signal {action!r} in {item!r}") from None
    return points


def hit(step: str) -> None:
    """Count one pass through ``step``; when a failpoint armed for it reaches its count, send its signal to this process."""
    text = os.environ.get(ENV, "")
    if not text:
        return
    global _armed
    with _lock:
        if _armed[0] != text:  # armed (or re-armed) since the last hit: start counting afresh
            _armed = (text, _parse(text))
            _counts.clear()
        point = _armed[1].get(step)
        if point is None:
            return
        _counts[step] += 1
        fire = _counts[step] == point[0]
    if fire:
        os.kill(os.getpid(), point[1])
