"""Reading a window of a JetStream stream (the thin I/O the economics reports need).

The reports read ``GF_EVENTS`` from a start time, once, with an ephemeral consumer that acks
nothing and is deleted after the read: a report never moves a durable consumer and never
changes the stream."""

from __future__ import annotations

import datetime

import orjson

FETCH_BATCH = 500
"""Messages per fetch."""
FETCH_TIMEOUT_S = 1.0
"""How long one fetch waits; an empty fetch ends the read (nothing pending)."""


async def read_stream_since(broker, stream: str, subjects: list[str], since_s: float | None,
                            until_s: float | None, limit: int, *, on_limit: type[Exception]) -> list[dict]:
    """Decoded JSON messages of ``stream`` on ``subjects`` stored at or after ``since_s``
    (None: from the first kept), oldest first, stopping at the first one stored after
    ``until_s`` (None: read to the end).

    :param broker: an open :class:`~gigafactory.broker.Broker`.
    :param stream: the stream's name.
    :param subjects: the subjects to read (one consumer filters them all).
    :param since_s: epoch seconds; the broker's stamp of each message decides.
    :param until_s: epoch seconds, or None.
    :param limit: past this many messages ``on_limit`` is raised (a bound on memory).
    :param on_limit: the exception class raised with a message that says to narrow the window.
    """
    from nats.js import api

    cfg = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=10.0, mem_storage=True,
                             filter_subjects=subjects)
    if since_s is None:
        cfg.deliver_policy = api.DeliverPolicy.ALL
    else:
        cfg.deliver_policy = api.DeliverPolicy.BY_START_TIME
        cfg.opt_start_time = datetime.datetime.fromtimestamp(since_s, datetime.UTC).isoformat()
    # With ``filter_subjects`` set, nats-py ignores the subject argument.
    psub = await broker.js.pull_subscribe(subjects[0], stream=stream, config=cfg)
    out: list[dict] = []
    try:
        while True:
            try:
                msgs = await psub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
            except Exception:  # nats-py raises a timeout when nothing is pending
                break
            for m in msgs:
                if until_s is not None and m.metadata.timestamp.timestamp() > until_s:
                    return out
                out.append(orjson.loads(m.data))
                if len(out) > limit:
                    raise on_limit(f"more than {limit} messages in {stream} since {since_s}: "
                                   f"narrow the window (--since)")
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
    finally:
        try:
            await psub.unsubscribe()
        except Exception:
            pass
    return out
