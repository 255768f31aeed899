"""Subject, stream, bucket and key names: the broker layout in one place.

Everything here is inspectable with the ``nats`` CLI, for example::

    nats kv get gf_jobs <job-id>
    nats kv ls gf_factories
    nats stream view GF_EVENTS --subject 'gf.events.<job-id>.>'
    nats micro ls
"""

from __future__ import annotations

import hashlib
import re
import secrets

JOBS_BUCKET = "gf_jobs"
"""One record per job (key: job id); every change is a compare-and-set on the key's revision."""
QUEUE_BUCKET = "gf_queue"
"""Index of queued jobs by pool (key: ``<pool>.<job-id>``), for the polling fallback: a factory
watches ``<pool>.>`` server-side instead of listing every job."""
FACTORIES_BUCKET = "gf_factories"
"""Factory descriptors and heartbeats (key: factory id)."""
POOLS_BUCKET = "gf_pools"
"""Dispatch pools (key: pool id; value: the canonical requirement set)."""
LOCKS_BUCKET = "gf_locks"
"""Distributed ``lock:`` holders (key: lock key; value: job id and epoch)."""
IDEMPOTENCY_BUCKET = "gf_idempotency"
"""``idempotency-key:`` -> job id and content hash."""
ARCHIVE_BUCKET = "gf_archive"
"""Finished jobs moved out of ``gf_jobs`` after ``archive_after_s`` (key: job id; value: the
job record without its body). Read on a miss in ``gf_jobs`` by dependency resolution,
idempotency and ``status``; capped by ``archive_max_bytes`` and ``archive_max_age_s``."""
CLOCK_BUCKET = "gf_clock"
"""Broker-stamped time: a writer puts a key and reads back the server's timestamp."""
CONTROL_BUCKET = "gf_control"
"""Fleet-wide operator controls (key ``halt``: the kill switch's state, :mod:`schemas.halt`).
Created by the first ``gigafactory halt``; absent means nothing is halted."""
PULLS_BUCKET = "gf_pulls"
"""The local forge's pull requests (gigafactory/forges/local.py). Created with the layout by a
layout role (admin, coordinator): a factory opening a pull request may write it, not create it."""
PULLS_HISTORY = 5
"""Revisions kept per pull request record: enough to read what it was before its merge."""
ARTIFACTS_STORE = "gf_artifacts"
"""Object store: run logs and captured artifacts."""

DISPATCH_STREAM = "GF_DISPATCH"
DISPATCH_PREFIX = "gf.dispatch"
EVENTS_STREAM = "GF_EVENTS"
EVENTS_PREFIX = "gf.events"
SPEND_STREAM = "GF_SPEND"
"""Append-only spend ledger (:mod:`~gigafactory.schemas.spend`): one record per usage report
of every attempt, a final one per attempt, and fixed costs; each with its ``Nats-Msg-Id``."""
SPEND_PREFIX = "gf.spend"
INVOICES_BUCKET = "gf_invoices"
"""Imported provider invoice lines (key: provider and a hash of the line's identity), so a
re-import of the same file writes nothing new."""
LOGS_PREFIX = "gf.logs"
"""Core NATS (not stored): live log lines of running jobs, for ``logs --follow``."""
API_PREFIX = "gf.api"
API_SERVICE = "gigafactory"

_KEY_SAFE = re.compile(r"[^A-Za-z0-9\-=]")
"""Characters a KV key keeps as they are. ``_`` is not one of them: it starts every escape, so
it is escaped itself, which makes :func:`safe_key` injective."""
_KEY_ESCAPE = re.compile(r"_(?:u([0-9a-f]{6})|([0-9a-f]{2}))")


def dispatch_subject(pool: str) -> str:
    return f"{DISPATCH_PREFIX}.{pool}"


def pool_consumer(pool: str) -> str:
    """The one shared durable pull consumer of a pool."""
    return f"pool-{pool}"


def events_subject(job_id: str, kind: str) -> str:
    return f"{EVENTS_PREFIX}.{job_id}.{kind}"


def spend_subject(job_id: str, epoch: int) -> str:
    """Where an attempt's spend records go: ``gf.spend.<job>.<epoch>``."""
    return f"{SPEND_PREFIX}.{job_id}.{epoch}"


def fixed_spend_subject(factory: str) -> str:
    """Where a factory's fixed-cost records go: ``gf.spend._fixed.<factory>`` (escaped)."""
    return f"{SPEND_PREFIX}._fixed.{safe_key(factory)}"


def fleet_events_subject(kind: str) -> str:
    """Events not about one job (scheduler passes, factory joins and leaves)."""
    return f"{EVENTS_PREFIX}._fleet.{kind}"


_PRODUCT_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def product_token(product: str) -> str:
    """A product's name as one subject token (pure, injective): the name itself when it is
    letters, digits, ``-`` and ``_`` (64 at most, and not starting with ``~``, so it never meets
    the other form), else ``~`` and the lower-case base32 of its UTF-8 bytes."""
    import base64

    if _PRODUCT_TOKEN_RE.fullmatch(product):
        return product
    return "~" + base64.b32encode(product.encode()).decode().rstrip("=").lower()


def logs_subject(job_id: str, epoch: int | str = ">", product: str | None = None) -> str:
    """Live output of one attempt: ``gf.logs.<product token>.<job>.<epoch>`` (by epoch; the
    default is the wildcard for every attempt, and without ``product`` for any product). The
    product is in the subject so that the broker can limit a submitter's live logs to its
    products (``gf.logs.<token>.>``: :mod:`gigafactory.identity`)."""
    tok = "*" if product is None else product_token(product)
    return f"{LOGS_PREFIX}.{tok}.{job_id}.{epoch}"


def log_object_name(job_id: str, attempt: int, epoch: int) -> str:
    return f"logs/{job_id}/attempt-{attempt}-epoch-{epoch}.log"


def queue_key(pool: str, job_id: str) -> str:
    return f"{pool}.{job_id}"


def safe_key(text: str) -> str:
    """Map arbitrary text (a lock name, an idempotency key) to a valid KV key, injectively and
    readably: letters, digits, ``-`` and ``=`` stay; every other character becomes ``_xx`` (two
    hex digits, below U+0100) or ``_uxxxxxx`` (six). ``_`` itself is escaped (``_5f``), so
    two different texts never share a key (``x/y`` -> ``x_2fy``, ``x_2fy`` -> ``x_5f2fy``);
    :func:`unsafe_key` reverses it."""
    return _KEY_SAFE.sub(_escape, text)


def _escape(m: re.Match) -> str:
    code = ord(m.group())
    return "_%02x" % code if code < 0x100 else "_u%06x" % code


def unsafe_key(key: str) -> str:
    """The text :func:`safe_key` made ``key`` from."""
    return _KEY_ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), key)


def legacy_safe_key(text: str) -> str:
    """The mapping :func:`safe_key` used before it was injective (``_`` kept, variable-width
    ``_u`` escapes), for reading entries written by an older coordinator. Its keys are
    ambiguous (``x/y`` and ``x_2fy`` share one), so a caller must compare the original text
    stored in the entry before trusting it."""
    return re.sub(r"[^A-Za-z0-9_\-=]",
                  lambda m: "_%02x" % ord(m.group()) if ord(m.group()) < 256 else "_u%x" % ord(m.group()), text)


JOB_ID_MAX_CHARS = 64
_JOB_ID_RE = re.compile(r"[a-z0-9][a-z0-9\-]{0,63}")


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the shape of a job id: lower-case letters, digits and ``-``, at most
    64 characters, no ``.`` (an id is one token of the subjects ``gf.events.<job>.<kind>`` and
    of the queue key ``<pool>.<job>``)."""
    return bool(_JOB_ID_RE.fullmatch(text))


JOB_ID_SUFFIX_CHARS = 16
"""The part of a job id after its readable stem: 16 characters of base 32, 80 bits. Random
ids of one stem collide with probability about n**2 / 2**81: 4e-15 among 100,000 jobs of
the same file name (3 random bytes, the old suffix, gave 27% among 3,000)."""
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
"""Base 32 without i, l, o and u: read aloud or copied by hand, no 1/l or 0/o mix-ups."""
_STEM_MAX_CHARS = 40


def _base32(data: bytes, chars: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(chars):
        n, r = divmod(n, 32)
        out.append(_ID_ALPHABET[r])
    return "".join(out)


def job_stem(hint: str) -> str:
    """The readable part of a job id: ``hint`` (a file name or an idempotency key) lower-cased,
    runs of other characters as one ``-``, at most 40 characters; ``job`` if nothing is left."""
    s = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")
    return s[:_STEM_MAX_CHARS].rstrip("-") or "job"


def new_job_id(hint: str) -> str:
    """A fresh job id: ``<stem>-<80 random bits>`` (see JOB_ID_SUFFIX_CHARS)."""
    return f"{job_stem(hint)}-{_base32(secrets.token_bytes(10), JOB_ID_SUFFIX_CHARS)}"


def derived_job_id(hint: str, namespace: str, identity: str) -> str:
    """The job id that ``identity`` always maps to: ``<stem>-<80 bits of SHA-256>``. Two
    submissions of one identity (an idempotency key, an inbox file) get the same id, so the
    job record's create-if-absent decides which of them creates the job: a retried or
    concurrent submission finds the job instead of making a second one. ``namespace`` keeps
    kinds of identity apart (an idempotency key ``x`` and an inbox file ``x`` differ)."""
    digest = hashlib.sha256(f"{namespace}\0{identity}".encode()).digest()
    return f"{job_stem(hint)}-{_base32(digest[:10], JOB_ID_SUFFIX_CHARS)}"
