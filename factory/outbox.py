"""A local durable outbox, and the quarantine for results that must never ship.

When the broker is unreachable, a factory keeps going: events and results it could not
publish are ``put`` here, and are published from here (oldest first) once it reconnects. On
reconnect the epoch decides: an item whose epoch is still current is published and marked
done; an item whose epoch turned stale is *quarantined*: kept on disk for a human, never
shipped.

Layout of ``directory``::

    outbox.sqlite3                       pending items (SQLite, WAL, synchronous=FULL)
    quarantine/<job>-epoch-<epoch>-<id>/ result.json and a copy of the log

Durability: ``put`` returns only after its transaction is committed and fsynced, so an item
that ``put`` acknowledged survives a crash of the process or the machine. A quarantine folder
is written under a temporary name, fsynced and then renamed, so it is either complete or not
there; if the process dies between the rename and the removal from pending, quarantining the
item again finds the folder and only finishes the removal.

Concurrency: calls are synchronous and short (safe from an asyncio loop), serialized by a
lock inside one process; another process may open the same directory (SQLite locks the file,
and waits up to ``busy_timeout_ms`` for the other writer).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass

from gigafactory.osproc import pid_alive

DB_NAME = "outbox.sqlite3"
QUARANTINE_DIR = "quarantine"
RESULT_NAME = "result.json"
LOG_NAME = "log.txt"

_BUSY_TIMEOUT_MS = 10_000
_PENDING_LIMIT_MAX = 10_000
_TMP_PREFIX = ".tmp-"
_JOB_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_JOB_NAME_MAX_CHARS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: an id is never reused
    kind TEXT NOT NULL,
    job TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True)
class OutboxItem:
    """One event or result waiting to be published."""

    id: int
    kind: str
    """What to publish, for example ``event`` or ``result``; the caller's vocabulary."""
    job: str
    epoch: int
    """The fencing token the factory held when it produced the item."""
    payload: bytes
    created_at: float
    """Unix time of ``put``."""
    attempts: int
    """How many times publishing was tried (``mark_attempt``)."""


class Outbox:
    """A durable FIFO of items to publish, plus the quarantine folder. See the module doc."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.quarantine_dir = os.path.join(self.directory, QUARANTINE_DIR)
        os.makedirs(self.quarantine_dir, exist_ok=True)
        self.db_path = os.path.join(self.directory, DB_NAME)
        self._lock = threading.Lock()
        # isolation_level=None: we issue transactions ourselves, so every put is committed
        # before it returns. check_same_thread=False: callers may use asyncio.to_thread; the
        # lock serializes them.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.db_path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(f"outbox {self.db_path}: SQLite refused WAL mode (got {mode!r}); is it on a network file system?")
        # FULL: the WAL is fsynced at every commit, so an acknowledged put survives power loss.
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(_SCHEMA)
        self._remove_abandoned_temp_folders()

    # -- the queue -------------------------------------------------------------------------

    def put(self, kind: str, job: str, epoch: int, payload: bytes) -> int:
        """Append an item; it is durable when this returns. Returns its id (increasing)."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"outbox kind must be a non-empty string, got {kind!r}")
        if not isinstance(job, str) or not job:
            raise ValueError(f"outbox job must be a non-empty string, got {job!r}")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"outbox epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"outbox payload must be bytes, got {type(payload).__name__}")
        with self._lock:
            cur = self._conn().execute(
                "INSERT INTO outbox (kind, job, epoch, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                (kind, job, epoch, bytes(payload), time.time()),
            )
            return int(cur.lastrowid)

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` items not yet done, oldest first."""
        if not isinstance(limit, int) or not 0 < limit <= _PENDING_LIMIT_MAX:
            raise ValueError(f"pending limit must be an int in 1..{_PENDING_LIMIT_MAX}, got {limit!r}")
        with self._lock:
            rows = self._conn().execute(
                "SELECT id, kind, job, epoch, payload, created_at, attempts FROM outbox ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    def mark_done(self, item_id: int) -> None:
        """Remove a published item. Unknown ids are ignored (another process may have done it)."""
        with self._lock:
            self._conn().execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def mark_done_many(self, item_ids: list[int], *, durable: bool = True) -> None:
        """Remove published items in one transaction (one fsync for a batch, not one per item).
        Unknown ids are ignored. At most :data:`_PENDING_LIMIT_MAX` ids per call.

        :param item_ids: the items published.
        :param durable: False: the removal is committed without an fsync (``synchronous =
            NORMAL`` for this transaction): it survives the process dying, and only a power
            loss or a crash of the machine may undo it, publishing the items once more at the
            next start. For a caller whose items are idempotent by id (the spend ledger's
            records), that costs nothing, and the fsync was most of a removal's cost. The
            next durable commit (a ``put``) fsyncs the log, and the removal with it."""
        if len(item_ids) > _PENDING_LIMIT_MAX:
            raise ValueError(f"mark_done_many takes at most {_PENDING_LIMIT_MAX} ids, got {len(item_ids)}")
        if not item_ids:
            return
        with self._lock:
            db = self._conn()
            if not durable:
                db.execute("PRAGMA synchronous = NORMAL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in item_ids])
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if not durable:
                    db.execute("PRAGMA synchronous = FULL")  # every other commit stays durable

    def mark_attempt(self, item_id: int) -> None:
        """Count one more publish attempt for an item."""
        with self._lock:
            self._conn().execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (item_id,))

    def count(self) -> int:
        """How many items are pending."""
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def changes(self) -> int:
        """A number that changes whenever this object added, removed or updated an item (the
        connection's change counter: no query). A caller that shows ``count()`` often (the
        heartbeat) counts again only when it moved; a count read while it stayed is still
        right unless another process wrote to the same folder, which only tests do."""
        return self._conn().total_changes

    def depth_and_oldest(self) -> tuple[int, float]:
        """How many items are pending, and the ``created_at`` of the oldest (0.0 when none):
        the metrics' outbox depth and age, in one read."""
        with self._lock:
            n, oldest = self._conn().execute("SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return int(n), float(oldest or 0.0)

    # -- the quarantine --------------------------------------------------------------------

    def quarantine(self, item: OutboxItem, reason: str, log_path: str | None = None) -> str:
        """Keep ``item`` on disk for a human instead of publishing it, and remove it from pending.

        Writes ``quarantine/<job>-epoch-<epoch>-<id>/`` with ``result.json`` (kind, job, epoch,
        reason, created_at, and the payload: as JSON if it is JSON, else base64) and a copy of
        the log at ``log_path`` if given. Returns the folder path. Quarantining the same item
        twice is harmless.
        """
        if not reason:
            raise ValueError("quarantine needs a reason (for example 'stale epoch 3, job is at 4')")
        final = os.path.join(self.quarantine_dir, _folder_name(item))
        with self._lock:
            conn = self._conn()
            if not os.path.isdir(final):
                self._write_folder(final, item, reason, log_path)
            conn.execute("DELETE FROM outbox WHERE id = ?", (item.id,))
        return final

    def quarantined(self) -> list[dict]:
        """The ``result.json`` of every quarantined item, oldest first."""
        records = []
        with os.scandir(self.quarantine_dir) as it:
            entries = list(it)
        for entry in entries:
            if entry.name.startswith(_TMP_PREFIX) or not entry.is_dir():
                continue
            try:
                with open(os.path.join(entry.path, RESULT_NAME), "rb") as f:
                    records.append(json.loads(f.read()))
            except (OSError, ValueError):
                # Not one of ours (someone copied a folder in by hand): leave it alone.
                continue
        records.sort(key=lambda r: (r.get("created_at", 0.0), r.get("id", 0)))
        return records

    def close(self) -> None:
        """Close the database. Further calls raise; closing twice is harmless."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"outbox {self.db_path} is closed")
        return self._db

    def _write_folder(self, final: str, item: OutboxItem, reason: str, log_path: str | None) -> None:
        tmp = os.path.join(self.quarantine_dir, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)
        try:
            record = _result_record(item, reason)
            if log_path is not None:
                try:
                    shutil.copyfile(log_path, os.path.join(tmp, LOG_NAME))
                    _fsync_file(os.path.join(tmp, LOG_NAME))
                    record["log"] = LOG_NAME
                except OSError as e:
                    # The result matters more than its log: keep it, and say why the log is missing.
                    record["log"] = None
                    record["log_error"] = f"could not copy {log_path}: {e}"
            result_path = os.path.join(tmp, RESULT_NAME)
            with open(result_path, "wb") as f:
                f.write(json.dumps(record, indent=2, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
                # Another process quarantined the same item first; its folder is complete.
                shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(self.quarantine_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _remove_abandoned_temp_folders(self) -> None:
        """Temporary folders of processes that died while quarantining (the item is still pending)."""
        with os.scandir(self.quarantine_dir) as it:
            entries = list(it)
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            try:
                pid = int(entry.name[len(_TMP_PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(entry.path, ignore_errors=True)


def _folder_name(item: OutboxItem) -> str:
    # Job ids come from the broker; keep the folder name a single safe path component.
    job = _JOB_NAME_CHARS_RE.sub("_", item.job)[:_JOB_NAME_MAX_CHARS].lstrip(".") or "job"
    return f"{job}-epoch-{item.epoch}-{item.id}"


def _result_record(item: OutboxItem, reason: str) -> dict:
    try:
        payload: object = json.loads(item.payload)
        encoding = "json"
    except (ValueError, UnicodeDecodeError):
        payload = base64.b64encode(item.payload).decode("ascii")
        encoding = "base64"
    return {
        "id": item.id,
        "kind": item.kind,
        "job": item.job,
        "epoch": item.epoch,
        "reason": reason,
        "created_at": item.created_at,
        "quarantined_at": time.time(),
        "attempts": item.attempts,
        "payload": payload,
        "payload_encoding": encoding,
        "log": None,
    }


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return  # Windows cannot open a directory for fsync; NTFS journals the rename.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

