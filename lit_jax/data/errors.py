"""Bad input: one clear message naming the file and record, or a counted skip.

Record-level problems (a missing field, a label without QA, an example longer than the
largest bucket, a malformed JSONL line) go through `BadRecords`, which raises or skips
according to `on_bad_record`. File-level problems (missing, empty or malformed `.json`
files) always raise: silently dropping a whole source would change the experiment.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger("lit_jax.data")

ON_BAD_RECORD = ("error", "skip")


class DataError(ValueError):
    """Bad data: the message names the file (and the record index where there is one)."""


def where(path: str, index: int | None = None) -> str:
    return f"{path}: record {index}" if index is not None else str(path)


class BadRecords:
    """Raises on the first bad record ('error') or counts and skips them ('skip')."""

    def __init__(self, policy: str = "error"):
        if policy not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record={policy!r}; expected one of {ON_BAD_RECORD}")
        self.policy = policy
        self.skipped: collections.Counter[str] = collections.Counter()
        self.first: dict[str, str] = {}

    def report(self, path: str, index: int | None, message: str) -> None:
        """Raise DataError, or record one skip for `path` (the caller then drops the record)."""
        text = f"{where(path, index)}: {message}"
        if self.policy == "error":
            raise DataError(text)
        self.skipped[str(path)] += 1
        self.first.setdefault(str(path), text)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def warn(self) -> None:
        """One warning per file with skips: how many, and the first reason."""
        for path, n in sorted(self.skipped.items()):
            log.warning("skipped %d bad record(s) in %s (first: %s)", n, path, self.first[path])

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.skipped.items()))
