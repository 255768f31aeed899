"""The ``verify`` gate, shared by every engine: after an engine passed, the manifest's
``verify`` command decides whether the attempt passes.

It runs with the engine's own working directory and environment, under the same supervisor,
cancel and self-fencing deadline, for what is left of the attempt's time (at least 1 s).
"""

from __future__ import annotations

import time

from gigafactory.schemas.manifest import FailureClass

from .. import shell
from .base import EngineJob, Outcome, Prepared


async def verify_gate(job: EngineJob, prepared: Prepared, passed: Outcome, started_s: float) -> Outcome:
    """Run ``job.manifest.verify`` after an engine that passed; returns the attempt's outcome.

    :param job: the attempt.
    :param prepared: what the engine ran with (its working directory and environment).
    :param passed: the engine's outcome (it passed): its detail is kept when there is no
        ``verify`` command.
    :param started_s: when the engine was started (``time.monotonic``): the gate gets what is
        left of ``job.timeout_s``.
    """
    m = job.manifest
    if not m.verify:
        return Outcome(None, f"{passed.detail}; no verify command", passed.exit_code)
    remaining = max(1.0, job.timeout_s - (time.monotonic() - started_s))
    v = await shell.run_command(
        m.verify, cwd=str(prepared.cwd), env=prepared.env, timeout_s=remaining, log_path=job.log_path,
        on_output=job.on_output, cancel=job.cancel, kill_grace_s=job.kill_grace_s,
        header=f"# gigafactory: verify: {m.verify}\n", fence=job.fence, supervised=job.supervised,
        redactor=job.redactor, sandbox=job.sandbox,
    )
    return classify_verify(v, job, passed.exit_code, remaining)


def classify_verify(v: shell.ProcessResult, job: EngineJob, exit_code: int | None, remaining_s: float) -> Outcome:
    """How the verify gate ended. ``exit_code`` stays the engine's; ``verify_exit_code`` is
    the command's.

    :param v: what the verify command did.
    :param job: the attempt.
    :param exit_code: the engine's exit code.
    :param remaining_s: the time the gate had.
    """
    m = job.manifest
    if v.fenced:
        return Outcome(FailureClass.CRASH, "self-fenced during verify", exit_code, v.exit_code, self_fenced=True)
    if v.cancelled:
        return Outcome(FailureClass.CRASH, "cancelled during verify", exit_code, v.exit_code)
    if v.timed_out:
        return Outcome(job.timeout_class, f"verify ran past the remaining {remaining_s:g}s", exit_code, v.exit_code)
    if v.exit_code != 0:
        return Outcome(FailureClass.VERIFY_FAILED, f"verify exited {v.exit_code}: {m.verify}", exit_code, v.exit_code)
    return Outcome(None, f"verify passed: {m.verify}", exit_code, v.exit_code)
