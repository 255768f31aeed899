"""The watched inbox folder: drop ``*.md`` job files in, they are submitted.

Nothing is lost: a submitted file moves to ``.submitted/`` (its job id written beside it as
``<name>.job``), a refused one to ``.rejected/`` with ``<name>.error.txt`` that names the
file, line and field. A file is picked up only once its size and mtime have been stable for
one scan, so a half-copied file is never read. Files that depend on each other can be dropped
together: every stable file of a scan is submitted as one batch, so deps between them resolve.

Nothing is created twice: each file is submitted with its identity (name, size, mtime and
content), from which intake derives the job id of an unkeyed file, and a keyed file's id
comes from its key. A batch that failed half-written (the broker went away, the coordinator
was killed) is submitted again and finds the jobs it wrote (``existing``).

Failures, by kind:
- a refusal (the file is invalid, or over a limit): the file moves to ``.rejected/`` at once;
- the broker not answering: every file stays, and the whole inbox pauses for a jittered
  back-off that doubles up to ``inbox_retry_max_s`` (the files that depend on each other
  stay together); never rejected for it;
- anything else (unexpected): the batch's files are retried one at a time with back-off, and
  a file that fails ``inbox_max_failures`` times moves to ``.rejected/`` with the error, so
  one file cannot hold the others back.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gigafactory.broker import TRANSIENT, Broker
from gigafactory.schemas.limits import Limits, hint

from . import intake

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
"""The first back-off after a failed batch; it doubles per failure up to ``inbox_retry_max_s``."""


@dataclass
class _Trouble:
    """A file whose submission failed unexpectedly: when to try again, and how often it failed."""

    sig: tuple[int, int]
    unexpected: int = 0
    """Failures that were neither a refusal nor the broker being away (rejects at the limit)."""
    retry_at: float = 0.0
    alone: bool = False
    """Submit this file in a batch of its own next time (an unexpected failure is then its own)."""
    error: str = ""


class Inbox:
    def __init__(self, broker: Broker, directory: str | os.PathLike) -> None:
        self.broker = broker
        self.dir = Path(directory)
        self.done = self.dir / ".submitted"
        self.rejected = self.dir / ".rejected"
        self.limits = Limits.from_settings(broker.settings)
        self.retry_max_s = float(broker.settings.inbox_retry_max_s)
        self.max_failures = int(broker.settings.inbox_max_failures)
        if self.retry_max_s <= 0 or self.max_failures < 1:
            raise ValueError(f"inbox_retry_max_s = {self.retry_max_s} must be above 0 and inbox_max_failures = "
                             f"{self.max_failures} at least 1 (GIGAFACTORY_INBOX_RETRY_MAX_S, "
                             "GIGAFACTORY_INBOX_MAX_FAILURES)")
        self._seen: dict[str, tuple[int, int]] = {}
        self._trouble: dict[str, _Trouble] = {}
        self._away = 0
        """Consecutive batches that failed because the broker was not answering."""
        self._paused_until = 0.0
        self.failed_batches = 0
        """Batches that failed with an error other than a refusal (retried, never lost)."""
        for d in (self.dir, self.done, self.rejected):
            d.mkdir(parents=True, exist_ok=True)

    def _stable(self) -> list[tuple[Path, tuple[int, int]]]:
        ready, seen = [], {}
        for p in sorted(self.dir.glob("*.md")):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            seen[p.name] = sig
            if self._seen.get(p.name) == sig:
                ready.append((p, sig))
        self._seen = seen
        # A file that changed since it failed is a new file: its failures are forgotten.
        self._trouble = {n: t for n, t in self._trouble.items() if seen.get(n) == t.sig}
        return ready

    @staticmethod
    def _move(src: Path, dest_dir: Path) -> Path:
        dest = dest_dir / src.name
        n = 1
        while dest.exists():
            dest = dest_dir / f"{src.stem}.{n}{src.suffix}"
            n += 1
        shutil.move(str(src), str(dest))
        return dest

    async def scan(self) -> int:
        """One pass. Returns how many files were submitted (created or found existing)."""
        now = time.monotonic()
        if now < self._paused_until:
            return 0
        ready = [(p, sig) for p, sig in self._stable()
                 if p.name not in self._trouble or self._trouble[p.name].retry_at <= now]
        if not ready:
            return 0
        batch: list[tuple[Path, str, str]] = []  # path, text, identity
        alone: list[tuple[Path, str, str]] = []
        total_bytes = 0
        lim = self.limits
        for p, (size, mtime_ns) in ready:
            if size > lim.max_job_file_bytes:
                self._reject(p, f"{p}: the job file is {size:,} bytes, more than {lim.max_job_file_bytes:,} "
                                f"{hint('max_job_file_bytes', lim.max_job_file_bytes)}; keep large inputs in the "
                                "repository and name them in the prompt")
                continue
            if len(batch) >= lim.max_batch_files or (batch and total_bytes + size > lim.max_batch_bytes):
                break  # the rest wait for the next scan
            try:
                data = p.read_bytes()
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                self._reject(p, f"{p}: cannot read as UTF-8 text: {e}; save the job file as UTF-8")
                continue
            except FileNotFoundError:  # taken by another coordinator watching the same folder
                continue
            except OSError as e:
                self._failed([p], e)
                continue
            total_bytes += size
            item = (p, text, intake.file_identity(p.name, data, size, mtime_ns))
            (alone if p.name in self._trouble and self._trouble[p.name].alone else batch).append(item)
        submitted = await self._submit(batch)
        for item in _dependency_order(alone):
            if time.monotonic() < self._paused_until:
                break
            submitted += await self._submit([item])
        return submitted

    async def _submit(self, pending: list[tuple[Path, str, str]]) -> int:
        """Submit ``pending`` as one batch; on refusal, reject the files named and retry the rest."""
        submitted = 0
        while pending:
            try:
                results = await intake.submit(self.broker, [(str(p), t) for p, t, _ in pending], source="inbox",
                                              identities=[i for _, _, i in pending])
            except intake.SubmitError as e:
                paths = {str(p) for p, _, _ in pending}
                bad = {err["file"] for err in e.errors} & paths
                if not bad:  # about the batch as a whole: a limit the inbox should have kept
                    self._failed([p for p, _, _ in pending], e)
                    return submitted
                for p, _, _ in pending:
                    if str(p) in bad:
                        self._reject(p, "\n".join(intake.format_error(err) for err in e.errors if err["file"] == str(p)))
                pending = [item for item in pending if str(item[0]) not in bad]
                continue
            except TRANSIENT as e:
                self._pause(len(pending), e)
                return submitted
            except Exception as e:  # a bug or an unforeseen refusal: isolate it, then give up on it
                log.exception("inbox: submitting %d file(s) failed unexpectedly", len(pending))
                self._failed([p for p, _, _ in pending], e)
                return submitted
            self._away = 0
            for (p, _, _), r in zip(pending, results):
                self._trouble.pop(p.name, None)
                try:
                    dest = self._move(p, self.done)
                except FileNotFoundError:  # moved by another coordinator watching this folder
                    continue
                dest.with_suffix(dest.suffix + ".job").write_text(f"{r.job}\n")
                log.info("inbox: %s -> job %s (%s, %s)", p.name, r.job, r.status, r.stage)
                submitted += 1
            pending = []
        return submitted

    def _pause(self, files: int, error: BaseException) -> None:
        """The broker is not answering: pause the whole inbox (every file stays where it is)."""
        self.failed_batches += 1
        self._away += 1
        pause = min(self.retry_max_s, RETRY_FIRST_S * 2 ** min(self._away - 1, 30))
        self._paused_until = time.monotonic() + random.uniform(pause / 2, pause)
        log.warning("inbox: %d file(s) not submitted, the broker is not answering (%s: %s); next try in "
                    "about %.1fs", files, type(error).__name__, error, pause)

    def _failed(self, paths: list[Path], error: BaseException) -> None:
        """Back off on ``paths`` after an unexpected ``error``: each is tried alone next, and a
        file alone that keeps failing is rejected at ``inbox_max_failures``."""
        self.failed_batches += 1
        text = f"{type(error).__name__}: {error}"
        now = time.monotonic()
        for p in paths:
            t = self._trouble.setdefault(p.name, _Trouble(self._seen.get(p.name, (0, 0))))
            if len(paths) > 1 and not t.alone:
                t.alone = True  # not counted: the failure may be another file's
            else:
                t.unexpected += 1
            t.error = text
            if t.unexpected >= self.max_failures:
                self._trouble.pop(p.name, None)
                self._reject(p, f"{p}: could not be submitted ({t.unexpected} attempts "
                                f"{hint('inbox_max_failures', self.max_failures)}); the last error: {text}")
                continue
            pause = min(self.retry_max_s, RETRY_FIRST_S * 2 ** min(t.unexpected, 30))
            t.retry_at = now + random.uniform(pause / 2, pause)
        log.warning("inbox: %d file(s) not submitted (%s); retrying after a back-off", len(paths), text)

    def _reject(self, p: Path, message: str) -> None:
        try:
            dest = self._move(p, self.rejected)
        except FileNotFoundError:
            return
        tmp = dest.with_suffix(dest.suffix + ".error.tmp")
        tmp.write_text(message + "\n")
        tmp.replace(dest.with_suffix(dest.suffix + ".error.txt"))
        log.warning("inbox: rejected %s: %s", p.name, message)


def _dependency_order(items: list[tuple[Path, str, str]]) -> list[tuple[Path, str, str]]:
    """``items`` with each file after the files whose idempotency keys it depends on (stable
    otherwise), so that files submitted one at a time still find their dependencies. A file
    that does not parse keeps its place: intake refuses it with the reason."""
    from gigafactory.schemas.manifest import ManifestError, parse_job_text

    keys: dict[str, int] = {}
    deps: list[list[str]] = []
    for i, (p, text, _) in enumerate(items):
        try:
            m = parse_job_text(text, str(p)).manifest
        except ManifestError:
            deps.append([])
            continue
        if m.idempotency_key is not None:
            keys.setdefault(m.idempotency_key, i)
        deps.append(m.deps)
    out: list[int] = []
    placed: set[int] = set()
    for start in range(len(items)):
        stack = [start]  # depth first, iteratively; a cycle is cut where it closes
        visiting: set[int] = set()
        while stack:
            i = stack[-1]
            if i in placed:
                stack.pop()
                continue
            visiting.add(i)
            before = [keys[d] for d in deps[i] if d in keys and keys[d] not in placed and keys[d] not in visiting]
            if before:
                stack.append(before[0])
                continue
            stack.pop()
            placed.add(i)
            out.append(i)
    return [items[i] for i in out]
