"""What a finished attempt reports: the payload the outbox keeps until the broker takes it.

Its own module so that the holder (which quarantines a fenced run's payload) and the reporting
mixin (which publishes it) share the type without importing each other.
"""

from __future__ import annotations

import msgspec

from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import Attribution, Usage, WorkspaceResult


class ResultPayload(msgspec.Struct):
    """What the outbox keeps for a finished attempt until the broker takes it."""

    job: str
    epoch: int
    failure: FailureClass | None
    detail: str
    exit_code: int | None
    verify_exit_code: int | None
    log_path: str
    log_object: str | None
    attribution: Attribution
    finished_at: float
    usage: Usage | None = None
    """What the engine reported it consumed (None: it reports nothing). Defaulted, so results
    kept in an outbox by an older factory still decode."""
    retry_after_s: float | None = None
    """For ``rate_limited``: the provider's retry-after as the engine read it (None: unknown)."""
    workspace: WorkspaceResult | None = None
    """A ``repo`` job's branch, head, diff stats and push (None: no repo)."""
