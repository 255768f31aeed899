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

from gigafactory.identity import verify_holder
from gigafactory.schemas import signing
from gigafactory.schemas.lifecycle import LEASED

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


async def quarantine_forged(sched) -> int:
    """Quarantine the forged writes :func:`forged` finds (see the module doc); how many."""
    if len(sched.sig_verified) > VERIFIED_MAX:
        sched.sig_verified.clear()
    n = 0
    for jid, revision, why in forged(sched.view, sched.sig_verified):
        if sched.is_poisoned(sched.view.jobs[jid]):
            continue
        sched.forged_total += 1
        await sched.quarantine(jid, revision, f"forged holder write: {why}", during="signature")
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
