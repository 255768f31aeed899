"""A factory's audit events are stored even when ``GF_EVENTS`` cannot take them at the moment
of the write they describe (a leader election on a cluster, the stream gone): they wait in the
factory's queue, in order, and are retried until stored, once each."""

from __future__ import annotations

import asyncio

import pytest

from helpers import Fleet, eventually, fast_settings, run

from gigafactory.schemas import names


def test_events_the_stream_refused_are_stored_later_in_order_and_once(nats_server, tmp_path):
    s = fast_settings(request_timeout_s=1.0)

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            f = await fleet.add_factory("f1", stations=1)
            gate = tmp_path / "gate"
            job = await fleet.submit_one(fleet.job(
                f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo done', review_policy="auto"))
            await fleet.wait_stage(job, "building")
            await eventually(lambda: not f._events, 10, what="the claim's events stored")
            published = f.stats["events_published"]

            # The audit stream goes away (what a publish meets while GF_EVENTS has no leader);
            # the job's own record writes go on.
            await fleet.admin.js.delete_stream(names.EVENTS_STREAM)
            gate.touch()
            await fleet.wait_stage(job, "shipped")
            await eventually(lambda: any(ev.kind == "finished" for ev, _ in f._events), 10,
                             what="the result's event waits in the factory's queue")
            assert f.stats["events_published"] == published, "an event was stored with no stream to store it"

            await fleet.admin.ensure_layout()  # the stream is back (empty)
            await eventually(lambda: not f._events, 15, what="the queued events stored")
            evs = await eventually(lambda: fleet.events(job), 10, what="the job's events after the outage")
            kinds = [e["kind"] for e in evs if e.get("factory") == "f1"]
            assert kinds[:1] == ["finished"] and kinds.count("finished") == 1, kinds
            assert f.stats["events_dropped"] == 0

    run(main(), timeout_s=90)


def test_a_cancel_swallowed_inside_a_publish_still_stops_the_events_task():
    # Python 3.11's asyncio.wait_for (inside nats-py's publish) returns the ack instead of raising
    # when a cancel lands as the ack does; the events task must still stop, or a drain that
    # gathers it waits forever.
    from gigafactory.factory import audit

    async def body():
        asyncio.current_task().cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # swallowed, as wait_for does when its future is done
        audit._raise_if_cancelled()
        return "kept going"

    async def main():
        task = asyncio.create_task(body())
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
