"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

| exit code | meaning                                                               |
|-----------|-----------------------------------------------------------------------|
| 0         | success                                                               |
| 1         | unexpected internal error (traceback with ``--verbose``)              |
| 2         | usage error: bad arguments, bad dataset, unknown backbone, mismatch   |
| 5         | ``featx bench``: some cells failed (the report is still written)      |
| 130       | interrupted (Ctrl-C)                                                  |
"""

from __future__ import annotations


class FeatxError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is one line that says what and where."""

    exit_code = 2


class UsageError(FeatxError):
    """Arguments that cannot work together or have invalid values."""


class DataError(FeatxError):
    """The dataset is missing, empty, malformed or unreadable."""


class UnknownBackboneError(UsageError):
    """A backbone name that is not in the registry (the message lists close matches)."""


class WeightsError(FeatxError):
    """Pretrained weights are not available offline or do not fit the architecture."""


class CacheError(FeatxError):
    """A feature cache is missing, incomplete, damaged or not the one that was asked for."""


class MismatchError(FeatxError):
    """A head, cache or checkpoint was made with a different backbone, layer or preprocessing."""


class HeadFileError(FeatxError):
    """A head file that featx did not write, that is damaged, or that holds types featx never loads."""


class BenchError(FeatxError):
    """Some cells of a benchmark grid failed; the report was still written."""

    exit_code = 5
