"""The coordinator's budget endpoints (entries of :class:`~gigafactory.coordinator.api.Api`'s
handler table): ``budget`` (the governor's state: today's budget, its inputs, the enforcement)
and ``budget_override`` (let a job held for its budget start)."""

from __future__ import annotations

import time

import msgspec

from gigafactory.broker import Conflict
from gigafactory.schemas.records import EventRecord, JobRecord, decode, encode

MAX_CAS_RETRIES = 5


class OverrideError(Exception):
    """Answered as an API error: ``code`` (404, 409, 400) and a message saying what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


async def state(api, body: dict) -> dict:
    """The governor's state now (read afresh when ``refresh`` is true in ``body``)."""
    gov = api.sched.governor
    if body.get("refresh"):
        gov.read_at_mono = -1e18
        await gov.refresh()
    return gov.state()


async def override(api, body: dict) -> dict:
    """Set ``budget_override`` on job ``body["job"]`` to ``body["actor"]`` (compare-and-set),
    say so in a ``budget_override`` event, and wake the scheduler: the next pass offers it.

    :param api: the coordinator's Api (its broker, view, actor).
    :param body: ``{"job": id, "actor": who, "reason": why}``.
    """
    job, who = body.get("job"), str(body.get("actor") or "operator")
    why = str(body.get("reason") or "")
    if not isinstance(job, str) or not job:
        raise OverrideError(400, "'job' (a job id) is required")
    limit = api.broker.settings.max_reason_chars
    if len(who) > limit or len(why) > limit:
        raise OverrideError(400, f"the actor and the reason may have at most {limit:,} characters each")
    for _ in range(MAX_CAS_RETRIES):
        e = await api.broker.jobs.get(job)
        if e is None:
            raise OverrideError(404, f"no job {job!r}; 'gigafactory jobs' lists them")
        rec = decode(e.value, JobRecord)
        if str(rec.stage) != "queued":
            raise OverrideError(409, f"job {job} is {rec.stage}: only a queued job waits for its budget")
        new = msgspec.structs.replace(rec, budget_override=who, updated_at=time.time())
        try:
            await api.broker.jobs.update(job, encode(new), last=e.revision)
        except Conflict:  # changed since read: read again
            continue
        await api.broker.publish_event(EventRecord(kind="budget_override", at=time.time(), job=job, epoch=rec.epoch,
                                              actor=who, reason=why or "budget overridden",
                                              data={"held_for": rec.reason}))
        api.view.changed.set()
        return {"job": job, "budget_override": who}
    raise OverrideError(409, f"job {job} kept changing; try again")
