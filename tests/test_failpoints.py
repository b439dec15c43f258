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


def test_a_rank_qualified_failpoint_fires_only_in_that_rank(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        monkeypatch.setenv(failpoints.ENV, "journal.chunk_written=2:SIGUSR1@rank1")
        monkeypatch.setenv("RANK", "0")  # another rank: never fires
        for _ in range(4):
            failpoints.hit("journal.chunk_written")
        assert seen == []
        monkeypatch.delenv("RANK")  # a plain process (no torchrun): never fires either
        monkeypatch.setenv(failpoints.ENV, "journal.chunk_written=2:SIGUSR1@rank1 ")  # re-armed
        for _ in range(4):
            failpoints.hit("journal.chunk_written")
        assert seen == []
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv(failpoints.ENV, "journal.chunk_written=2:SIGUSR1@rank1")  # re-armed in rank 1
        failpoints.hit("journal.chunk_written")
        assert seen == []
        failpoints.hit("journal.chunk_written")
        assert seen == [signal.SIGUSR1]
        assert "failpoint journal.chunk_written=2 fired on rank 1: sending SIGUSR1" in capfd.readouterr().err
        failpoints.hit("journal.chunk_written")
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize(
    "spec", ["journal.chunk_written=1:SIGINT@1", "journal.chunk_written=1:SIGINT@rankx", "journal.chunk_written=1:SIGINT@"]
)
def test_a_malformed_rank_qualifier_is_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(failpoints.ENV, spec)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="rank qualifier"):
        failpoints.hit("journal.chunk_written")
