"""The watched inbox folder: drop ``*.md`` job files in, they are submitted.

Nothing is lost: a submitted file moves to ``.submitted/`` (its job id written beside it as
``<name>.job``), a refused one to ``.rejected/`` with ``<name>.error.txt`` that names the
file, line and field. A file is picked up only once its size and mtime have been stable for
one scan, so a half-copied file is never read. Files that depend on each other can be dropped
together: every stable file of a scan is submitted as one batch, so deps between them resolve.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from gigafactory.broker import Broker

from . import intake

log = logging.getLogger("gigafactory.coordinator")


class Inbox:
    def __init__(self, broker: Broker, directory: str | os.PathLike) -> None:
        self.b = broker
        self.dir = Path(directory)
        self.done = self.dir / ".submitted"
        self.rejected = self.dir / ".rejected"
        self._seen: dict[str, tuple[int, int]] = {}
        for d in (self.dir, self.done, self.rejected):
            d.mkdir(parents=True, exist_ok=True)

    def _stable(self) -> list[Path]:
        ready, seen = [], {}
        for p in sorted(self.dir.glob("*.md")):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            seen[p.name] = sig
            if self._seen.get(p.name) == sig:
                ready.append(p)
        self._seen = seen
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
        """One pass. Returns how many files were submitted."""
        ready = self._stable()
        if not ready:
            return 0
        texts = []
        for p in ready:
            try:
                texts.append((p, p.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError) as e:
                self._reject(p, f"{p}: cannot read as UTF-8 text: {e}")
        pending = texts
        submitted = 0
        # Submit the batch; on refusal, reject the files named and retry the rest.
        while pending:
            try:
                results = await intake.submit(self.b, [(str(p), t) for p, t in pending], source="inbox")
            except intake.SubmitError as e:
                bad = {err["file"] for err in e.errors}
                if not bad & {str(p) for p, _ in pending}:
                    for p, _ in pending:
                        self._reject(p, str(e))
                    return submitted
                for p, _ in pending:
                    if str(p) in bad:
                        msgs = [intake._fmt(err) for err in e.errors if err["file"] == str(p)]
                        self._reject(p, "\n".join(msgs))
                pending = [(p, t) for p, t in pending if str(p) not in bad]
                continue
            for (p, _), r in zip(pending, results):
                dest = self._move(p, self.done)
                dest.with_suffix(dest.suffix + ".job").write_text(f"{r.job}\n")
                log.info("inbox: %s -> job %s (%s, %s)", p.name, r.job, r.status, r.stage)
                submitted += 1
            pending = []
        return submitted

    def _reject(self, p: Path, message: str) -> None:
        dest = self._move(p, self.rejected)
        tmp = dest.with_suffix(dest.suffix + ".error.tmp")
        tmp.write_text(message + "\n")
        tmp.replace(dest.with_suffix(dest.suffix + ".error.txt"))
        log.warning("inbox: rejected %s: %s", p.name, message)
