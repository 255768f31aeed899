"""Shapes the coordinator's API answers with, shared by the coordinator and the client."""

from __future__ import annotations

from .records import JobRecord


class ApiError(Exception):
    """An API request refused or failed: ``code`` is an HTTP-like status (400 bad request,
    404 unknown job, 409 wrong stage, 503/504 no coordinator), ``errors`` the per-file details
    of a refused submit ({file, line, field, message}). The coordinator raises it, the
    service sends it as a NATS micro error, and the client raises the same class again."""

    def __init__(self, code: int, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.errors = int(code), message, errors or []

    @property
    def is_client_error(self) -> bool:
        """The request was wrong (4xx): sending it again will not help."""
        return 400 <= self.code < 500


def job_summary(rec: JobRecord) -> dict:
    """One job as ``list``, ``status`` and the client's ``wait`` show it.

    :param rec: the job's record (from ``gf_jobs`` or the archive).
    """
    return {
        "id": rec.id, "stage": str(rec.stage), "priority": str(rec.manifest.priority),
        "product": rec.manifest.product, "attempt": rec.attempt, "epoch": rec.epoch,
        "holder": rec.lease.factory if rec.lease else None, "reason": rec.reason,
        "submitted_at": rec.submitted_at, "source": rec.source,
        "idempotency_key": rec.manifest.idempotency_key, "lock": rec.manifest.lock,
        "deps": rec.deps, "requirements": rec.requirements,
    }
