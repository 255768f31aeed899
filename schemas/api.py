"""Shapes the coordinator's API answers with, shared by the coordinator and the client."""

from __future__ import annotations

from .records import JobRecord


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
