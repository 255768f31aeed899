"""The built-in ``noop`` engine, for the load suite: it completes at once, starts no process and
writes no log, so a run measures the claim protocol, not the cost of a fork.

``verify`` is skipped too (nothing ran, so there is nothing to verify): the attempt passes with
no verify exit code, and its detail says so. Opt-in: only a factory started with the
``engine:noop`` capability token (``--cap engine:noop``) offers and runs it; elsewhere it fails
as any engine this factory does not offer, so real work can never be swallowed by it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import Engine, EngineJob, Outcome, Prepared, ProbeResult

NOOP_ENGINE = "noop"
"""The name jobs give it (``engine: noop``)."""


class NoopEngine(Engine):
    """Does nothing, at once (see the module's docstring)."""

    name = NOOP_ENGINE
    engine_class = "script"
    opt_in = True
    verifies = False
    starts_process = False

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Always runnable; being opt-in, it is offered only when named with ``--cap``.

        :param environ: unused.
        :param path: unused.
        :param timeout_s: unused.
        """
        return ProbeResult(True)

    def prepare(self, job: EngineJob) -> Prepared:
        """Nothing to build: no process, no working directory needed (it is not checked).

        :param job: the attempt.
        """
        return Prepared(cwd=job.cwd, env={})

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Pass at once; the detail says whether a ``verify`` was skipped.

        :param job: the attempt.
        :param prepared: unused.
        """
        skipped = "; verify skipped (noop engine)" if job.manifest.verify else ""
        return Outcome(None, f"noop engine: completed at once{skipped}", 0)
