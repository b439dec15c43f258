"""Failpoints fire on the exact pass they were armed for, with a real signal, and reject a malformed spec."""

from __future__ import annotations

import signal

import pytest

from featx import failpoints


def test_a_failpoint_fires_once_on_its_count_with_a_real_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        monkeypatch.setenv(failpoints.ENV, "journal.chunk_written=3:SIGUSR1")
        for i in range(1, 6):
            failpoints.hit("finetune.checkpoint_saved")  # another step: not counted
            failpoints.hit("journal.chunk_written")
            assert seen == ([signal.SIGUSR1] if i >= 3 else []), i
        monkeypatch.setenv(failpoints.ENV, "journal.chunk_written=1:SIGUSR1")  # re-armed: counting starts over
        failpoints.hit("journal.chunk_written")
        assert seen == [signal.SIGUSR1] * 2
        monkeypatch.delenv(failpoints.ENV)
        failpoints.hit("journal.chunk_written")
        assert len(seen) == 2
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize(
    "spec", ["journal.chunk_written", "nosuch.step=1:SIGINT", "journal.chunk_written=0:SIGINT", "journal.chunk_written=1:SIGNOPE"]
)
def test_a_malformed_failpoint_is_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(failpoints.ENV, spec)
    with pytest.raises(ValueError, match="FEATX_FAILPOINTS"):
        failpoints.hit("journal.chunk_written")
