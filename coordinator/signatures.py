"""The coordinator's check of signed holder writes (see schemas/signing.py): every reaper pass,
each job record in a leased stage must carry a valid signature by the nkey its lease holder
published in its descriptor. One that does not (written by another identity, or tampered with)
is quarantined like a poison record (its bytes kept in ``gf_artifacts``, a ``poisoned`` event
naming why, no pass touches that revision), counted in ``gigafactory_forged_writes_total``,
and raised by the ``GigafactoryForgedJobWrite`` alert.

A record is judged once per revision (a verified revision is remembered), so a pass costs one
signature check per leased record that changed since the last pass.
"""

from __future__ import annotations

import logging
import time

from gigafactory.identity import verify_holder
from gigafactory.schemas.records import EventRecord
from gigafactory.schemas import signing
from gigafactory.schemas.lifecycle import LEASED

log = logging.getLogger(__name__)

VERIFIED_MAX = 100_000
"""Most verified (job, revision) pairs remembered; beyond, the memory starts afresh."""


def forged(view, verified: dict[str, int]) -> list[tuple[str, int, str]]:
    """(job, revision, why) of every leased record in ``view`` whose signature does not hold;
    ``verified`` (job -> revision) is updated with those that do."""
    out = []
    for jid in list(view.stage_ids(*LEASED)):
        st = view.jobs.get(jid)
        if st is None or verified.get(jid) == st.revision or st.record.lease is None:
            continue
        holder = view.factories.get(st.record.lease.factory)
        key = holder.record.nkey if holder is not None else None
        why = signing.holder_verdict(st.record, key, verify_holder)
        if why is None:
            if key is not None:
                verified[jid] = st.revision
            continue
        out.append((jid, st.revision, why))
    return out


SEEN_MAX = 1000
"""Most forged revisions remembered between two reaper passes (beyond: counted, not reported)."""


def observer(view, verified: dict[str, int], seen: dict[tuple[str, int], str]):
    """A view listener that judges every revision as it arrives (a forged write the holder
    overwrites before the next reaper pass is caught too): forged ones go into ``seen``."""
    def on_job(old, new) -> None:
        if new is None or new.record.stage not in LEASED or len(seen) >= SEEN_MAX:
            return
        try:
            for jid, revision, why in _judge(view, new, verified):
                seen[(jid, revision)] = why
        except Exception:  # a listener never raises (the view would take it as the record's fault)
            log.exception("signature check of gf_jobs/%s failed", new.record.id)
    return on_job


def _judge(view, st, verified: dict[str, int]) -> list[tuple[str, int, str]]:
    if verified.get(st.record.id) == st.revision or st.record.lease is None:
        return []
    holder = view.factories.get(st.record.lease.factory)
    key = holder.record.nkey if holder is not None else None
    why = signing.holder_verdict(st.record, key, verify_holder)
    if why is None:
        if key is not None:
            verified[st.record.id] = st.revision
        return []
    return [(st.record.id, st.revision, why)]


async def quarantine_forged(sched) -> int:
    """Quarantine the forged writes seen since the last pass and those :func:`forged` finds in
    the view now (see the module doc); how many. A forged revision that is still the current one
    is quarantined (bytes kept, ``poisoned`` event); one overwritten since gets a ``forged_write``
    event naming it."""
    if len(sched.sig_verified) > VERIFIED_MAX:
        sched.sig_verified.clear()
    found = dict(sched.forged_seen)
    sched.forged_seen.clear()
    for jid, revision, why in forged(sched.view, sched.sig_verified):
        found.setdefault((jid, revision), why)
    n = 0
    for (jid, revision), why in sorted(found.items()):
        st = sched.view.jobs.get(jid)
        reason = f"forged holder write: {why}"
        if st is not None and st.revision == revision:
            if sched.is_poisoned(st):
                continue
            await sched.quarantine(jid, revision, reason, during="signature")
        else:
            log.error("gf_jobs/%s revision %d: %s (overwritten since)", jid, revision, reason)
            await sched.broker.publish_event(EventRecord(
                kind="forged_write", at=time.time(), job=jid, epoch=st.record.epoch if st else None,
                actor=sched.actor, reason=f"revision {revision}: {reason}"[:2000], data={"revision": revision}))
        sched.forged_total += 1
        n += 1
    return n


REVOKED = "revoked"
"""The descriptor status ``gigafactory creds revoke`` writes for a revoked factory (the factory
itself cannot overwrite it: the broker refuses its connection from then on)."""


def lease_stamp(view, st) -> float:
    """The broker time the reaper judges ``st``'s lease from: the revision's stamp, or minus
    infinity when its holder was revoked, so the lease is reclaimed (and fenced by the bumped
    epoch) at the next pass instead of after ``lease_ttl_s``."""
    lease = st.record.lease
    holder = view.factories.get(lease.factory) if lease is not None else None
    if holder is not None and holder.record.status == REVOKED:
        return float("-inf")
    return st.ts
