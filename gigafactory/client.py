"""A small client for the coordinator's API (``gf.api.*``), used by the CLI and tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import orjson

from gigafactory.schemas import names
from gigafactory.schemas.limits import Limits, hint
from gigafactory.schemas.lifecycle import TERMINAL, Stage

RESTING = frozenset(TERMINAL | {Stage.TESTING, Stage.REVIEW})
"""Stages where a job waits for a human or is done: ``submit --wait`` stops there."""


class ApiError(Exception):
    def __init__(self, code: str, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.errors = code, message, errors or []


class NoCoordinator(ApiError):
    pass


class Client:
    def __init__(self, nc, timeout_s: float = 10.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    @classmethod
    async def connect(cls, url: str, timeout_s: float = 10.0, name: str = "gigafactory-cli") -> "Client":
        nc = await nats.connect(servers=[u.strip() for u in url.split(",")], name=name, connect_timeout=5,
                                max_reconnect_attempts=3, reconnect_time_wait=0.5)
        return cls(nc, timeout_s)

    async def close(self) -> None:
        await self.nc.close()

    async def call(self, endpoint: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        try:
            msg = await self.nc.request(f"{names.API_PREFIX}.{endpoint}", orjson.dumps(body or {}),
                                        timeout=timeout_s or self.timeout_s)
        except nats.errors.MaxPayloadError:
            raise ApiError("400", f"the {endpoint} request is larger than the broker's max payload "
                                  f"({self.nc.max_payload:,} bytes); send less at once") from None
        except nats.errors.NoRespondersError:
            raise NoCoordinator("503", "no coordinator is answering on gf.api.*: start one with "
                                       "'gigafactory coordinator' (or 'gigafactory up')") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise NoCoordinator("504", f"the coordinator did not answer {endpoint} within "
                                       f"{timeout_s or self.timeout_s:g}s") from None
        code = msg.headers.get("Nats-Service-Error-Code") if msg.headers else None
        if code:
            text = msg.headers.get("Nats-Service-Error", "")
            try:
                data = orjson.loads(msg.data) if msg.data else {}
            except orjson.JSONDecodeError:
                data = {}
            raise ApiError(code, data.get("error") or text, data.get("errors"))
        return orjson.loads(msg.data)

    async def submit_files(self, paths: list[str], source: str = "cli", limits: Limits | None = None) -> list[dict]:
        """Submit job files as one batch. Refuses, before sending anything, a batch or a file
        over ``limits`` (default: from ``GIGAFACTORY_*``) and a request larger than the
        broker's max payload, naming the file and the limit (:class:`ApiError`, code 400)."""
        from gigafactory.config import Settings

        try:
            lim = limits or Limits.from_settings(Settings.from_env())
        except ValueError as e:  # a limit set to nonsense in the environment
            raise ApiError("400", f"invalid setting: {e}") from None
        if len(paths) > lim.max_batch_files:
            msg = (f"{len(paths):,} files in one batch, more than {lim.max_batch_files:,} "
                   f"{hint('max_batch_files', lim.max_batch_files)}; submit them in smaller batches")
            raise ApiError("400", msg, [{"file": "<batch>", "line": None, "field": None, "message": msg}])
        files = []
        for p in paths:
            try:
                size = Path(p).stat().st_size
            except OSError as e:
                raise ApiError("400", f"{p}: cannot read: {e.strerror}",
                               [{"file": p, "line": None, "field": None, "message": f"cannot read: {e.strerror}"}]) from None
            if size > lim.max_job_file_bytes:
                msg = lim.refusal("max_job_file_bytes", "the job file", size, "bytes",
                                  "keep large inputs in the repository and name them in the prompt")
                raise ApiError("400", f"{p}: {msg}", [{"file": p, "line": None, "field": None, "message": msg}])
            try:
                text = Path(p).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ApiError("400", f"{p}: not UTF-8 text; save the job file as UTF-8",
                               [{"file": p, "line": None, "field": None, "message": "not UTF-8 text"}]) from None
            except OSError as e:
                raise ApiError("400", f"{p}: cannot read: {e.strerror}",
                               [{"file": p, "line": None, "field": None, "message": f"cannot read: {e.strerror}"}]) from None
            files.append({"path": p, "text": text})
        body = {"files": files, "source": source}
        request_bytes = len(orjson.dumps(body))
        if request_bytes > self.nc.max_payload:
            msg = (f"the {len(files)} files make a request of {request_bytes:,} bytes, more than the broker's max "
                   f"payload ({self.nc.max_payload:,} bytes); submit them in smaller batches (a file that depends "
                   "on another's idempotency-key can go in a later batch)")
            raise ApiError("400", msg, [{"file": "<batch>", "line": None, "field": None, "message": msg}])
        return (await self.call("submit", body, timeout_s=max(self.timeout_s, 30)))["jobs"]

    async def wait(self, job_ids: list[str], *, timeout_s: float, on_progress=None, until=RESTING) -> dict[str, dict]:
        """Poll ``list`` until every job is in ``until`` (bounded by ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        want = set(job_ids)
        while True:
            resp = await self.call("list", {"limit": 100000})
            seen = {j["id"]: j for j in resp["jobs"] if j["id"] in want}
            if on_progress:
                on_progress(seen)
            if len(seen) == len(want) and all(j["stage"] in until for j in seen.values()):
                return seen
            if loop.time() > deadline:
                return seen
            await asyncio.sleep(0.25)
