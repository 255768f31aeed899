"""Signed holder writes (pure): what a lease holder signs, and how a reader checks it.

Subject permissions cannot narrow a factory's writes on ``gf_jobs`` to the jobs it holds (a KV
bucket is one subject per key, and the keys a factory will claim are not known in advance). So
every write a holder makes carries its signature (``JobRecord.sig``) by its nkey over
:func:`signed_message`: the job, the epoch, the stage and the hash of the record's content. The
holder's public key is in its descriptor (``FactoryRecord.nkey``), which only the factory itself
may write. A record in a leased stage whose signature is missing or does not verify against its
lease holder's key was written by someone else (another factory's stolen credential, a tool):
the coordinator quarantines it (coordinator/signatures.py) and the invariant checker counts it.

The cryptography is passed in (``sign``/``verify`` callables: Ed25519 nkeys in
:mod:`gigafactory.identity`), so this module stays pure.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import msgspec

from .lifecycle import LEASED
from .records import JobRecord, encode

SIG_MAX_CHARS = 200
"""A ``sig`` longer than this is not one (a 56-character key, ``:``, 88 characters of base64)."""


def content_hash(rec: JobRecord) -> str:
    """SHA-256 of the record's bytes without its signature."""
    return hashlib.sha256(encode(msgspec.structs.replace(rec, sig=None))).hexdigest()


def signed_message(rec: JobRecord) -> bytes:
    """What a holder signs: job, epoch, stage and content hash, one per line."""
    return f"gigafactory-holder-write\n{rec.id}\n{rec.epoch}\n{rec.stage}\n{content_hash(rec)}".encode()


def signed(rec: JobRecord, public_key: str, sign: Callable[[bytes], bytes]) -> JobRecord:
    """``rec`` with its ``sig`` set by the holder whose key is ``public_key``."""
    raw = sign(signed_message(rec))
    return msgspec.structs.replace(rec, sig=f"{public_key}:{base64.b64encode(raw).decode('ascii')}")


def holder_verdict(rec: JobRecord, holder_key: str | None, verify: Callable[[str, bytes, bytes], bool]) -> str | None:
    """Why ``rec`` was not written by its lease holder, or None when it was (or cannot be told).

    :param rec: the record as stored.
    :param holder_key: the public nkey in the holder's descriptor (None: the holder has no
        identity, or no descriptor is known: nothing to check against).
    :param verify: ``verify(public_key, message, signature) -> bool``.
    """
    if rec.stage not in LEASED or rec.lease is None or not holder_key:
        return None
    if not rec.sig:
        return f"unsigned write in stage {rec.stage} (holder {rec.lease.factory} signs its writes)"
    if len(rec.sig) > SIG_MAX_CHARS or ":" not in rec.sig:
        return "the signature is not '<key>:<base64>'"
    key, _, b64 = rec.sig.partition(":")
    if key != holder_key:
        return f"signed by {key[:12]}…, not by the lease holder {rec.lease.factory} ({holder_key[:12]}…)"
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        return "the signature is not base64"
    if not verify(key, signed_message(rec), raw):
        return f"the signature of {rec.lease.factory} does not match the record (job, epoch, stage or content changed)"
    return None
