"""A small client for the coordinator's API (``gf.api.*``), used by the CLI and tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import orjson

from gigafactory import tracing
from gigafactory.schemas import names
from gigafactory.schemas.api import ApiError, job_summary
from gigafactory.schemas.records import JobRecord, decode
from gigafactory.schemas.limits import Limits, hint
from gigafactory.schemas.lifecycle import TERMINAL, Stage

RESTING = frozenset(TERMINAL | {Stage.TESTING, Stage.REVIEW})
"""Stages where a job waits for a human or is done: ``submit --wait`` stops there."""

MAX_WAIT_JOBS = 100_000
"""The most jobs one :meth:`Client.wait` follows (a batch is at most ``max_batch_files``)."""

WATCH_PER_KEY_MAX = 16
"""Up to this many jobs, :meth:`Client.wait` watches each job's key; above, the whole bucket."""


class NoCoordinator(ApiError):
    """No coordinator answered (503: none listening; 504: none in time)."""


class Client:
    def __init__(self, nc, timeout_s: float = 10.0, identity: tuple[str, str] | None = None) -> None:
        """:param identity: (role, name) of the credentials ``nc`` connected with; the human
            gate's calls then go to the caller's own subject (see :func:`gate_subject`)."""
        self.nc = nc
        self.timeout_s = timeout_s
        self.identity = identity

    @classmethod
    async def connect(cls, url: str, timeout_s: float = 10.0, name: str = "gigafactory-cli") -> "Client":
        """Connect through the one connect path every part uses (:func:`gigafactory.broker.connect`:
        connection errors are logged at debug level, never printed as tracebacks), giving up
        after a few reconnect attempts: a CLI call should fail, not hang, on a broker that is gone.

        :param url: the broker URL(s), comma-separated.
        :param timeout_s: how long each API request may take.
        :param name: the connection's name, as the broker's monitoring shows it.
        """
        from gigafactory.broker import connect
        from gigafactory.config import Settings

        try:
            settings = Settings.from_env()
        except ValueError:
            settings = Settings()  # a bad setting is reported by the command that needs it
        from gigafactory.identity import read_creds, resolve_creds

        nc = await connect(url, name, settings, max_reconnect_attempts=3, connect_timeout_s=5.0)
        path = resolve_creds(settings.creds)
        creds = read_creds(path) if path else None
        return cls(nc, timeout_s, identity=(creds.role, creds.name) if creds is not None else None)

    async def close(self) -> None:
        await self.nc.close()

    def _subject(self, endpoint: str) -> str:
        from gigafactory.identity import GATE_ENDPOINTS, gate_subject

        if endpoint in GATE_ENDPOINTS and self.identity is not None and self.identity[0] in ("admin", "reviewer"):
            return gate_subject(endpoint, *self.identity)
        return f"{names.API_PREFIX}.{endpoint}"

    async def call(self, endpoint: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        try:
            msg = await self.nc.request(self._subject(endpoint), orjson.dumps(body or {}),
                                        timeout=timeout_s or self.timeout_s, headers=tracing.inject())
        except nats.errors.MaxPayloadError:
            raise ApiError(400, f"the {endpoint} request is larger than the broker's max payload "
                                  f"({self.nc.max_payload:,} bytes); send less at once") from None
        except nats.errors.NoRespondersError:
            raise NoCoordinator(503, "no coordinator is answering on gf.api.*: start one with "
                                       "'gigafactory coordinator' (or 'gigafactory up')") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise NoCoordinator(504, f"the coordinator did not answer {endpoint} within "
                                       f"{timeout_s or self.timeout_s:g}s") from None
        code = msg.headers.get("Nats-Service-Error-Code") if msg.headers else None
        if code:
            text = msg.headers.get("Nats-Service-Error", "")
            try:
                data = orjson.loads(msg.data) if msg.data else {}
            except orjson.JSONDecodeError:
                data = {}
            raise ApiError(int(code) if code.isdigit() else 500, data.get("error") or text, data.get("errors"))
        return orjson.loads(msg.data)

    async def submit_files(self, paths: list[str], source: str = "cli", limits: Limits | None = None) -> list[dict]:
        """Submit job files as one batch. Refuses, before sending anything, a batch or a file
        over ``limits`` (default: from ``GIGAFACTORY_*``) and a request larger than the
        broker's max payload, naming the file and the limit (:class:`ApiError`, code 400)."""
        from gigafactory.config import Settings

        try:
            lim = limits or Limits.from_settings(Settings.from_env())
        except ValueError as e:  # a limit set to nonsense in the environment
            raise ApiError(400, f"invalid setting: {e}") from None
        if len(paths) > lim.max_batch_files:
            msg = (f"{len(paths):,} files in one batch, more than {lim.max_batch_files:,} "
                   f"{hint('max_batch_files', lim.max_batch_files)}; submit them in smaller batches")
            raise ApiError(400, msg, [{"file": "<batch>", "line": None, "field": None, "message": msg}])
        files = []
        for p in paths:
            try:
                size = Path(p).stat().st_size
            except OSError as e:
                raise ApiError(400, f"{p}: cannot read: {e.strerror}",
                               [{"file": p, "line": None, "field": None, "message": f"cannot read: {e.strerror}"}]) from None
            if size > lim.max_job_file_bytes:
                msg = lim.refusal("max_job_file_bytes", "the job file", size, "bytes",
                                  "keep large inputs in the repository and name them in the prompt")
                raise ApiError(400, f"{p}: {msg}", [{"file": p, "line": None, "field": None, "message": msg}])
            try:
                text = Path(p).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"{p}: not UTF-8 text; save the job file as UTF-8",
                               [{"file": p, "line": None, "field": None, "message": "not UTF-8 text"}]) from None
            except OSError as e:
                raise ApiError(400, f"{p}: cannot read: {e.strerror}",
                               [{"file": p, "line": None, "field": None, "message": f"cannot read: {e.strerror}"}]) from None
            files.append({"path": p, "text": text})
        body = {"files": files, "source": source}
        request_bytes = len(orjson.dumps(body))
        if request_bytes > self.nc.max_payload:
            msg = (f"the {len(files)} files make a request of {request_bytes:,} bytes, more than the broker's max "
                   f"payload ({self.nc.max_payload:,} bytes); submit them in smaller batches (a file that depends "
                   "on another's idempotency-key can go in a later batch)")
            raise ApiError(400, msg, [{"file": "<batch>", "line": None, "field": None, "message": msg}])
        with tracing.span("submit", kind="client", files=len(files), source=source):
            return (await self.call("submit", body, timeout_s=max(self.timeout_s, 30)))["jobs"]

    async def wait(self, job_ids: list[str], *, timeout_s: float, on_progress=None, until=RESTING) -> dict[str, dict]:
        """Follow the jobs' records until every one is in ``until``, or ``timeout_s`` passed.

        Watches the jobs' keys in ``gf_jobs`` (one watch, filtered to these keys; the broker
        pushes each change), so a wait costs nothing while nothing happens and does not depend
        on the coordinator answering. A job whose record is no longer in ``gf_jobs`` (archived
        after it ended) is read once through the ``status`` API. Returns each job's summary as
        last seen (a job never seen is missing from the result). When the broker refuses the
        watch (no JetStream access), it falls back to asking ``status`` for each job.

        :param job_ids: the jobs to follow (at most :data:`MAX_WAIT_JOBS`).
        :param timeout_s: give up after this many seconds, returning what was seen.
        :param on_progress: called with the summaries (id -> summary) after each change.
        :param until: the stages that end the wait.
        """
        if len(job_ids) > MAX_WAIT_JOBS:
            raise ApiError(400, f"cannot wait for {len(job_ids):,} jobs at once (at most {MAX_WAIT_JOBS:,}); "
                                  "wait for them in smaller groups")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        want = set(job_ids)
        seen: dict[str, dict] = {}

        def done() -> bool:
            return len(seen) == len(want) and all(j["stage"] in until for j in seen.values())

        try:
            kv = await self.nc.jetstream(timeout=self.timeout_s).key_value(names.JOBS_BUCKET)
            # A few jobs: one watch per key. More: one watch on the bucket, keeping ours (it
            # replays every record once, but costs one consumer instead of thousands).
            watchers = ([await kv.watch(job) for job in sorted(want)] if len(want) <= WATCH_PER_KEY_MAX
                        else [await kv.watchall()])
        except Exception:
            return await self._wait_by_status(want, seen, deadline, on_progress, until)
        changes: asyncio.Queue = asyncio.Queue()

        async def pump(w) -> None:
            while True:
                try:
                    changes.put_nowait(await w.updates(timeout=60.0))
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue

        pumps = [asyncio.create_task(pump(w)) for w in watchers]
        try:
            replays_left = len(watchers)
            while not (replays_left == 0 and done()):
                left_s = deadline - loop.time()
                if left_s <= 0:
                    break
                try:
                    e = await asyncio.wait_for(changes.get(), timeout=left_s)
                except asyncio.TimeoutError:
                    break
                if e is None:
                    replays_left -= 1
                    if replays_left:
                        continue
                    # The end of what the bucket held when the watch began: a job not in it was
                    # archived after it ended (or never existed): ask the coordinator once.
                    for job in sorted(want - seen.keys()):
                        try:
                            seen[job] = (await self.call("status", {"job": job, "events": 0}))["job"]
                        except ApiError:
                            pass
                elif e.key in want and e.value and e.operation is None:
                    try:
                        seen[e.key] = job_summary(decode(e.value, JobRecord))
                    except Exception:
                        continue  # an undecodable record: the coordinator quarantines it
                else:
                    continue
                if on_progress:
                    on_progress(dict(seen))
        finally:
            for t in pumps:
                t.cancel()
            for w in watchers:
                try:
                    await w.stop()
                except Exception:
                    pass
        return seen

    async def _wait_by_status(self, want: set[str], seen: dict[str, dict], deadline: float, on_progress,
                              until) -> dict[str, dict]:
        loop = asyncio.get_running_loop()
        while True:
            for job in sorted(want):
                if job in seen and seen[job]["stage"] in until:
                    continue
                try:
                    seen[job] = (await self.call("status", {"job": job, "events": 0}))["job"]
                except ApiError as e:
                    if isinstance(e, NoCoordinator):
                        raise
            if on_progress:
                on_progress(dict(seen))
            if (len(seen) == len(want) and all(j["stage"] in until for j in seen.values())) \
                    or loop.time() > deadline:
                return seen
            await asyncio.sleep(0.5)
