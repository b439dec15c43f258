"""Failpoints: stop a run at an exact step, so that tests (and users reproducing a report) need not race it.

A test that wants "Ctrl-C after the second journal chunk is on disk" used to poll the folder and then signal the
process; a run that finished the remaining chunks between two polls made the test fail for reasons that had nothing to
do with featx. Instead, featx names the steps where an interruption matters and a caller arms them through one
environment variable, read only here::

    FEATX_FAILPOINTS="journal.chunk_written=2:SIGINT,finetune.checkpoint_saved=1:SIGKILL"

``name=N:ACTION`` fires on the N-th time (1-based, per process) the step is reached; ``ACTION`` is a signal name the
process sends itself (``SIGINT``, ``SIGTERM``, ``SIGKILL``, ...), so the run goes through exactly the handling a real
signal gets. ``name=N:ACTION@rankR`` arms it only in the process whose ``RANK`` (set by torchrun) is ``R``, so a test
can kill exactly one rank of a distributed run; that rank first prints one line saying so on stderr (a SIGKILL
leaves no other trace of its own). Unset (the default), :func:`hit` is a dictionary lookup and nothing else.
The steps featx names:

- ``journal.chunk_written``: a journal chunk is durable (renamed and its folder fsynced);
- ``finetune.checkpoint_saved``: a fine-tuning checkpoint (any stage) is durable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter

ENV = "FEATX_FAILPOINTS"
STEPS = ("journal.chunk_written", "finetune.checkpoint_saved")

_lock = threading.Lock()
_armed: tuple[str, dict[str, tuple[int, signal.Signals, int | None]]] = ("", {})
_counts: Counter[str] = Counter()


def _parse(text: str) -> dict[str, tuple[int, signal.Signals, int | None]]:
    """name -> (count, signal, rank or None), for the failpoints armed in this process (``@rankR`` ones elsewhere are
    checked but left out)."""
    points: dict[str, tuple[int, signal.Signals, int | None]] = {}
    my_rank = os.environ.get("RANK")
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, rest = item.partition("=")
        count, sep2, action = rest.partition(":")
        action, at, where = action.partition("@")
        if not sep or not sep2 or name not in STEPS or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{ENV}: bad failpoint {item!r} (expected NAME=N:SIGNAL[@rankR] with NAME one of {', '.join(STEPS)})"
            )
        rank = None
        if at:
            if not (where.startswith("rank") and where[4:].isdigit()):
                raise ValueError(f"{ENV}: bad rank qualifier {'@' + where!r} in {item!r} (expected @rank<R>, e.g. @rank1)")
            rank = int(where[4:])
        try:
            sig = signal.Signals[action.upper()]
        except KeyError:
            raise ValueError(f"{ENV}: unknown signal {action!r} in {item!r}") from None
        if rank is None or str(rank) == my_rank:
            points[name] = (int(count), sig, rank)
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
        if point[2] is not None:
            print(
                f"featx: failpoint {step}={point[0]} fired on rank {point[2]}: sending {point[1].name} to itself",
                file=sys.stderr,
                flush=True,
            )
        os.kill(os.getpid(), point[1])
