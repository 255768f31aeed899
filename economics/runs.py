"""``pipeline_runs``: a row per shipped feature, in a SQLite database the coordinator keeps.

The product owner's table (seed 001), one row per feature that ships:

    feature_slug, spec_path, pr_number, merged_at (ISO), elapsed_seconds, tokens_total, cost_usd,
    features_per_second_per_token, per_role_breakdown (JSON: tokens and cost per profile)

plus ``job`` (the key: a row is written once, however often the job is seen shipped) and
``product``. A *feature* is a ``kind: composite`` job or a job whose manifest says
``feature: true``; a ``cosmetic: true`` job never is. A composite's figures include the jobs
that name it as their ``parent``. ``elapsed_seconds`` runs from the first submission (the
composite's or a child's) to the ship; ``features_per_second_per_token`` is
``1 / (elapsed_seconds × tokens_total)`` (NULL when either is 0: a run with no token count is
not infinitely efficient). Tokens and cost come from the spend ledger when it has the job,
else from the attempts' attribution on the job records.

A second table, ``job_outcomes``, keeps every job that ended (shipped, failed, dead-lettered)
with its profile, engine, model, cost and latency: what ``report routing`` reads for pass rates
and p95 latencies.

Pure row-building (:func:`is_feature`, :func:`run_row`, :func:`outcome_row`) is apart from the
database (:class:`RunsDB`) and the coordinator's listener (:class:`RunsRecorder`).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from gigafactory.schemas.records import JobRecord

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_runs (
    id INTEGER PRIMARY KEY,
    job TEXT UNIQUE NOT NULL,
    product TEXT,
    feature_slug TEXT,
    spec_path TEXT,
    pr_number INTEGER,
    merged_at TEXT,
    elapsed_seconds INTEGER,
    tokens_total INTEGER,
    cost_usd REAL,
    features_per_second_per_token REAL,
    per_role_breakdown JSON
);
CREATE TABLE IF NOT EXISTS job_outcomes (
    job TEXT PRIMARY KEY,
    ended_at REAL NOT NULL,
    stage TEXT NOT NULL,
    profile TEXT,
    engine TEXT,
    model TEXT,
    cost_usd REAL,
    tokens_total INTEGER,
    latency_s REAL,
    attempts INTEGER
);
CREATE INDEX IF NOT EXISTS job_outcomes_ended ON job_outcomes(ended_at);
"""

ENDED = ("shipped", "failed", "dead_letter")
PENDING_MAX = 100_000
"""At most this many ended jobs wait to be written (a flood beyond it is written from the next
replay: rows are keyed by job, so nothing is counted twice)."""
QUERY_MAX_ROWS = 100_000
"""A report reads at most this many rows."""
WRITE_CHUNK_JOBS = 1000
"""Ended jobs one write handles: a coordinator's restart replays every finished job (100,000),
and their rows built at once held ~100 MB for a moment; a chunk bounds that."""
KNOWN_QUERY_MAX = 500
"""Job ids per ``IN (...)`` query (SQLite's variable limit is 999 on old builds)."""


def is_feature(rec: JobRecord) -> bool:
    """Whether ``rec`` counts as a feature (see the module's definition)."""
    m = rec.manifest
    return not m.cosmetic and (m.kind == "composite" or m.feature)


def _stem(source: str) -> str:
    """A job file's name without folder and suffix (``api:jobs/epic.md`` -> ``epic``)."""
    if source.startswith(("api:", "inbox:")):
        source = source.split(":", 1)[1]
    return Path(source).stem


def _children(rec: JobRecord, jobs: Mapping[str, JobRecord]) -> list[JobRecord]:
    """The jobs naming ``rec`` as their ``parent`` (by its id, idempotency key or file name)."""
    names = {rec.id, rec.manifest.idempotency_key, _stem(rec.source)}
    return [j for j in jobs.values() if j.manifest.parent and j.manifest.parent in names and j.id != rec.id]


def job_spend(rec: JobRecord, ledger: Mapping[str, tuple[int, float]]) -> tuple[int, float]:
    """(tokens, cost) of one job: the ledger's when it has the job, else its attempts'."""
    if rec.id in ledger:
        return ledger[rec.id]
    tokens = sum(a.attribution.tokens_in + a.attribution.tokens_out + a.attribution.tokens_cached for a in rec.attempts)
    return tokens, sum(a.attribution.cost_usd for a in rec.attempts)


def _pr_number(rec: JobRecord) -> int | None:
    for a in reversed(rec.attempts):
        if a.workspace is not None and a.workspace.pull_number is not None:
            return a.workspace.pull_number
    return None


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def run_row(rec: JobRecord, jobs: Mapping[str, JobRecord], ledger: Mapping[str, tuple[int, float]]) -> dict:
    """The ``pipeline_runs`` row of a shipped feature (pure).

    :param rec: the shipped job.
    :param jobs: every job record known (its children are found here).
    :param ledger: job id -> (tokens, cost) from the spend ledger (may be empty).
    """
    members = [rec, *_children(rec, jobs)]
    roles: dict[str, dict] = {}
    tokens_total, cost = 0, 0.0
    for j in members:
        t, c = job_spend(j, ledger)
        tokens_total, cost = tokens_total + t, cost + c
        role = roles.setdefault(j.profile.name if j.profile is not None else "none",
                                {"tokens": 0, "cost_usd": 0.0, "jobs": 0})
        role["tokens"] += t
        role["cost_usd"] = round(role["cost_usd"] + c, 6)
        role["jobs"] += 1
    shipped_at = rec.updated_at or time.time()
    elapsed = max(0, int(round(shipped_at - min(j.submitted_at for j in members))))
    fpst = 1.0 / (elapsed * tokens_total) if elapsed > 0 and tokens_total > 0 else None
    return {"job": rec.id, "product": rec.manifest.product,
            "feature_slug": rec.manifest.tracker_item or _stem(rec.source) or rec.id,
            "spec_path": rec.source, "pr_number": _pr_number(rec), "merged_at": _iso(shipped_at),
            "elapsed_seconds": elapsed, "tokens_total": tokens_total, "cost_usd": round(cost, 6),
            "features_per_second_per_token": fpst, "per_role_breakdown": json.dumps(roles, sort_keys=True)}


def outcome_row(rec: JobRecord, ledger: Mapping[str, tuple[int, float]]) -> dict:
    """The ``job_outcomes`` row of an ended job (pure)."""
    tokens, cost = job_spend(rec, ledger)
    last = rec.attempts[-1] if rec.attempts else None
    ended = rec.updated_at or time.time()
    return {"job": rec.id, "ended_at": ended, "stage": str(rec.stage),
            "profile": rec.profile.name if rec.profile is not None else None,
            "engine": (last.engine if last else None) or rec.manifest.engine,
            "model": (last.attribution.model if last else None) or rec.manifest.model,
            "cost_usd": cost, "tokens_total": tokens, "latency_s": max(0.0, ended - rec.submitted_at),
            "attempts": len(rec.attempts)}


class RunsDB:
    """The SQLite database (one file; created with its tables on first open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def write(self, runs: Iterable[dict], outcomes: Iterable[dict]) -> int:
        """Insert rows not there yet (keyed by job); returns how many runs were new."""
        with self._connect() as db:
            before = db.total_changes
            for r in runs:
                db.execute(f"INSERT OR IGNORE INTO pipeline_runs ({', '.join(r)}) VALUES "
                           f"({', '.join('?' * len(r))})", tuple(r.values()))
            new = db.total_changes - before
            for o in outcomes:
                db.execute(f"INSERT OR IGNORE INTO job_outcomes ({', '.join(o)}) VALUES "
                           f"({', '.join('?' * len(o))})", tuple(o.values()))
        return new

    def known(self, jobs: list[str]) -> set[str]:
        """Which of ``jobs`` have their ``job_outcomes`` row already (a job's rows are written
        in one transaction: its run row too, if it has one)."""
        out: set[str] = set()
        with self._connect() as db:
            for i in range(0, len(jobs), KNOWN_QUERY_MAX):
                part = jobs[i:i + KNOWN_QUERY_MAX]
                out.update(r[0] for r in db.execute(
                    f"SELECT job FROM job_outcomes WHERE job IN ({', '.join('?' * len(part))})", part))
        return out

    def runs(self, since_s: float | None = None) -> list[dict]:
        q, args = "SELECT * FROM pipeline_runs", ()
        if since_s is not None:
            q, args = q + " WHERE merged_at >= ?", (_iso(since_s),)
        with self._connect() as db:
            return [dict(r) for r in db.execute(q + f" ORDER BY merged_at LIMIT {QUERY_MAX_ROWS}", args)]

    def outcomes(self, since_s: float | None = None) -> list[dict]:
        q, args = "SELECT * FROM job_outcomes", ()
        if since_s is not None:
            q, args = q + " WHERE ended_at >= ?", (since_s,)
        with self._connect() as db:
            return [dict(r) for r in db.execute(q + f" ORDER BY ended_at LIMIT {QUERY_MAX_ROWS}", args)]


def default_db_path(settings) -> Path:
    """``runs_db``, or ``<GIGAFACTORY_HOME>/coordinator/runs.sqlite``."""
    from gigafactory.config import home

    return Path(settings.runs_db) if settings.runs_db else home() / "coordinator" / "runs.sqlite"


def ledger_by_job(records) -> dict[str, tuple[int, float]]:
    """job -> (tokens, cost) summed over spend records (deltas, as ``read_spend`` gives them)."""
    out: dict[str, tuple[int, float]] = {}
    for r in records:
        if r.job:
            t, c = out.get(r.job, (0, 0.0))
            out[r.job] = (t + r.tokens_total, c + r.cost_usd)
    return out


class RunsRecorder:
    """The coordinator's listener: jobs that end are written (a feature's run, every job's
    outcome) by :meth:`flush`, which the coordinator runs on a loop. The view's replay at start
    passes every job again, so a row missed while the coordinator was down is written then."""

    def __init__(self, broker, view, settings, ledger=None) -> None:
        """:param ledger: the coordinator's :class:`~gigafactory.economics.ledger.LedgerPass`
        (None: the whole ledger is read at each flush that writes a row)."""
        self.broker, self.view, self.settings, self.ledger = broker, view, settings, ledger
        self.db: RunsDB | None = None
        self.pending: set[str] = set()
        self.written = 0
        self.features = 0
        """Features this recorder wrote (new rows) since it started (a metric)."""
        self.features_cost_usd = 0.0

    def on_job(self, old, new) -> None:
        if new is None or str(new.record.stage) not in ENDED:
            return
        if old is not None and old.stage == new.stage:  # old.stage: a finished job's record is packed
            return
        if len(self.pending) < PENDING_MAX:
            self.pending.add(new.record.id)

    async def flush(self) -> None:
        if not self.pending:
            return
        ids, self.pending = self.pending, set()
        try:
            await self._write(ids)
        except BaseException:
            self.pending |= ids  # written next round (rows are keyed by job: never twice)
            raise

    async def _write(self, ids: set[str]) -> None:
        """Write the rows of the ended jobs ``ids`` that have none yet, WRITE_CHUNK_JOBS at a
        time. A restart's replay passes every finished job again: those written before are
        skipped before their records are decoded (the view holds them packed)."""
        if self.db is None:
            self.db = await asyncio.to_thread(RunsDB, default_db_path(self.settings))
        order = sorted(ids)
        ledger: Mapping[str, tuple[int, float]] | None = None
        jobs: dict[str, JobRecord] | None = None
        for i in range(0, len(order), WRITE_CHUNK_JOBS):
            part = order[i:i + WRITE_CHUNK_JOBS]
            known = await asyncio.to_thread(self.db.known, part)
            view_jobs = self.view.jobs
            todo = [st for jid in part if jid not in known and (st := view_jobs.get(jid)) is not None]
            if not todo:
                continue
            if ledger is None:  # read once per flush, and only when a row is written
                ledger = await self._ledger()
            runs, outcomes = [], []
            for st in todo:
                rec = st.record
                outcomes.append(outcome_row(rec, ledger))
                if str(rec.stage) == "shipped" and is_feature(rec):
                    if jobs is None:
                        # A feature's run needs its children: only the jobs that name a parent
                        # are decoded, and only in a flush that writes a feature's run (a walk
                        # over the whole view, so not on every flush).
                        jobs = {jid: s.record for jid, s in view_jobs.items() if s.parent is not None}
                    runs.append(run_row(jobs.get(st.key) or rec, jobs, ledger))
            new = await asyncio.to_thread(self.db.write, runs, outcomes)
            self.written += new
            if new and new == len(runs):  # all new: count them (a replay's rows are not)
                self.features += new
                self.features_cost_usd += sum(r["cost_usd"] for r in runs)

    async def _ledger(self) -> Mapping[str, tuple[int, float]]:
        """job -> (tokens, dollars) from the spend ledger: the coordinator's running totals
        (``ledger``, read incrementally) when it has them, else the whole ledger read once."""
        try:
            if self.ledger is not None:
                return (await self.ledger.catch_up()).jobs
            from .ledger import read_spend  # the ledger helper's reader (issue 13)

            return ledger_by_job(await read_spend(self.broker))
        except Exception as e:  # the job records' attribution stands in
            log.warning("pipeline_runs: ledger not read (%s); using the job records' attribution", e)
            return {}


class MergeQueue:
    """Merge-queue occupancy (jobs in ``review`` or ``testing``: passed, waiting to ship) and
    refill latency (how long it last stayed empty), kept from the view's job changes."""

    STAGES = ("review", "testing")

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.members: set[str] = set()
        self.empty_since: float | None = None
        self.last_refill_s = 0.0

    @property
    def occupancy(self) -> int:
        return len(self.members)

    def on_job(self, old, new) -> None:
        if new is None and old is None:
            return  # a key deleted that the view never held (an archived job's record): nothing moved
        jid = (new or old).key  # not .record: a finished job's is packed (decoded on each read)
        inside = new is not None and str(new.stage) in self.STAGES
        if inside and jid not in self.members:
            if not self.members and self.empty_since is not None:
                self.last_refill_s = self.clock() - self.empty_since
            self.members.add(jid)
        elif not inside and jid in self.members:
            self.members.discard(jid)
            if not self.members:
                self.empty_since = self.clock()
