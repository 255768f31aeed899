"""The ``shell`` engine: the job's fenced ``sh``/``bash`` blocks, run as one script with bash
(or sh) in the job's ``cwd``.

Built in: offered wherever a POSIX shell is (everywhere but a Windows machine without bash or
sh). Its output is only a log: no progress or usage is read from it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping

from gigafactory.schemas.manifest import FailureClass, shell_script

from .. import shell
from .base import Engine, EngineJob, Outcome, Prepared, ProbeResult, classify_exit, engine_environment, require_cwd


class ShellEngine(Engine):
    """Runs the job body's shell blocks (:func:`gigafactory.schemas.manifest.shell_script`)."""

    name = "shell"
    engine_class = "script"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Runnable wherever bash or sh is on ``path``, and on any POSIX system regardless (a
        job's own ``PATH`` may name the shell; ``shell.run_script`` says so if none is found).

        :param environ: unused: the shell engine needs no credential.
        :param path: the search path for bash and sh.
        :param timeout_s: unused: nothing is run.
        """
        windows = sys.platform in ("win32", "cygwin", "msys")
        has_posix_shell = any(shutil.which(sh, path=path) for sh in ("bash", "sh"))
        if windows and not has_posix_shell:
            return ProbeResult(False, why="neither bash nor sh is on PATH")
        return ProbeResult(True)

    def prepare(self, job: EngineJob) -> Prepared:
        """The working directory (checked), the environment (:func:`engine_environment`), and
        the script extracted from the body.

        :param job: the attempt.
        """
        require_cwd(job)
        return Prepared(cwd=job.cwd, env=engine_environment(job), script=shell_script(job.body))

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run the script with :func:`shell.run_script`; classified by :func:`classify_exit`.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        assert prepared.script is not None
        try:
            res = await shell.run_script(
                prepared.script, cwd=str(prepared.cwd), env=prepared.env, timeout_s=job.timeout_s,
                log_path=job.log_path, on_output=job.on_output, cancel=job.cancel, kill_grace_s=job.kill_grace_s,
                header=job.header, fence=job.fence, supervised=job.supervised,
                redactor=job.redactor, sandbox=job.sandbox,
            )
        except FileNotFoundError as e:
            return Outcome(FailureClass.SETUP_FAILED, str(e))
        return classify_exit(res, job)


__all__ = ["ShellEngine"]
