"""A run log on its way to the object store: read in bounded chunks, capped per attempt.

The factory hands :class:`CappedLog` (a reader, never the bytes) to the object store, which
reads it chunk by chunk on a worker thread: however large the log, the factory holds one
chunk of it at a time, and its event loop (lease renewals) never waits on the disk.

A log over the cap is stored as its head, a marker line, and its tail: the head holds the
header and the setup, the tail the failure or the summary an engine prints last, so the tail
gets three quarters. The marker says how many bytes were dropped and where the whole log
still is (on the factory's disk). The cap is per attempt, so an engine that floods its output
costs the store a bounded amount.
"""

from __future__ import annotations

import io
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .redact import Redactor

HEAD_SHARE = 4
"""A capped log keeps its first ``cap // HEAD_SHARE`` bytes, and its tail fills the rest."""


def cap_plan(size_bytes: int, cap_bytes: int, marker_bytes: int) -> tuple[int, int]:
    """``(head_bytes, tail_bytes)`` to keep of a log of ``size_bytes`` so that head, a marker of
    ``marker_bytes`` and tail fit ``cap_bytes``; ``(size_bytes, 0)`` when the whole log fits."""
    assert cap_bytes > marker_bytes >= 0, (cap_bytes, marker_bytes)
    if size_bytes <= cap_bytes:
        return size_bytes, 0
    keep = cap_bytes - marker_bytes
    head = keep // HEAD_SHARE
    return head, keep - head


def marker(dropped_bytes: int, size_bytes: int, where: str) -> bytes:
    """The line that stands for the dropped middle of a capped log."""
    return (f"\n# gigafactory: {dropped_bytes} bytes of this log ({size_bytes} in all) were dropped here "
            f"(log_upload_max_bytes); the whole log is at {where}\n").encode()


class CappedLog(io.RawIOBase):
    """Read the log at ``path`` as it is when opened: whole if it fits ``cap_bytes``, else head,
    :func:`marker`, tail (at most ``cap_bytes`` in all). ``deadline`` (monotonic seconds, or
    None) ends the read with :class:`LogUploadTimeout`: raised from inside the object store's
    loop, so the store removes the chunks sent so far (a cancelled upload would leave them).

    After reading: ``size_bytes`` (the file), ``dropped_bytes``, ``stored_bytes`` and
    ``max_read_bytes`` (the largest single read: the most held in memory at once)."""

    def __init__(self, path: str, cap_bytes: int, where: str, deadline: float | None = None,
                 redactor: "Redactor | None" = None) -> None:
        super().__init__()
        # The log on disk is redacted as it is written (the engine's output); this catches
        # what the factory wrote into it itself, so the stored copy never holds a secret.
        self._redact = redactor.stream() if redactor is not None else None
        self._pending = b""
        self._f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.size_bytes = os.fstat(self._f.fileno()).st_size
        self.deadline = deadline
        # The marker names the dropped count, at most as many digits as the size: room for
        # the longest it can be, so head, marker and tail never exceed the cap.
        head, tail = cap_plan(self.size_bytes, cap_bytes, len(marker(self.size_bytes, self.size_bytes, where)))
        self.dropped_bytes = self.size_bytes - head - tail
        mark = marker(self.dropped_bytes, self.size_bytes, where) if self.dropped_bytes else b""
        self._parts: list[tuple[int, int] | bytes] = [(0, head)]
        if self.dropped_bytes:
            self._parts += [mark, (self.size_bytes - tail, tail)]
        self.stored_bytes = head + len(mark) + tail
        self.max_read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._redact is None:
            return self._read_raw(buf)
        raw = bytearray(len(buf))
        while len(self._pending) < len(buf):
            n = self._read_raw(raw)
            if n == 0:
                self._pending += self._redact.flush()
                break
            self._pending += self._redact.feed(bytes(raw[:n]))
        k = min(len(buf), len(self._pending))
        memoryview(buf)[:k] = self._pending[:k]
        self._pending = self._pending[k:]
        return k

    def _read_raw(self, buf) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LogUploadTimeout("the log upload ran past log_upload_timeout_s")
        view = memoryview(buf)
        n = 0
        while n < len(view) and self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                k = min(len(part), len(view) - n)
                view[n:n + k] = part[:k]
                self._parts[0] = part[k:]
                if not self._parts[0]:
                    self._parts.pop(0)
            else:
                offset, left = part
                k = min(left, len(view) - n)
                self._f.seek(offset)
                got = self._f.readinto(view[n:n + k])
                if not got:  # the file shrank under us: store what there is
                    self._parts.pop(0)
                    continue
                k = got
                self._parts[0] = (offset + k, left - k)
                if left - k == 0:
                    self._parts.pop(0)
            n += k
        self.max_read_bytes = max(self.max_read_bytes, n)
        return n

    def close(self) -> None:
        f = getattr(self, "_f", None)  # None when open() failed in __init__
        if f is not None:
            f.close()
        super().close()


class LogUploadTimeout(Exception):
    """A log upload ran past ``log_upload_timeout_s``."""
