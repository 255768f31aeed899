"""Running a chaos scenario by name: the registry (filled by importing
:mod:`gigafactory.chaos.scenarios`) and the overall time limit around one run.

Above the scenarios and the lab they use (:mod:`harness`), so that neither imports the other
back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import scenarios  # noqa: F401 (importing them registers them)
from .harness import SCENARIOS, SIDE_EFFECT_FIGURES, Scenario, ScenarioConfig, ScenarioResult

log = logging.getLogger(__name__)


def registry() -> dict[str, Scenario]:
    """Every implemented scenario, by name."""
    return SCENARIOS


def time_limit_s(config: ScenarioConfig) -> float:
    """The overall bound on one run: generous, so only a hang reaches it."""
    return 240.0 if config.bounded else config.duration_s + 300.0


async def run_scenario(name: str, config: ScenarioConfig) -> ScenarioResult:
    """Run scenario ``name`` under :func:`time_limit_s`. A scenario that raises or overruns
    becomes a failed result naming why, never an exception."""
    scen = registry().get(name)
    if scen is None:
        raise KeyError(f"no scenario {name!r}; 'gigafactory chaos list' names them: {', '.join(sorted(SCENARIOS))}")
    config.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    task = asyncio.ensure_future(scen.fn(config))
    try:
        # asyncio.wait, not wait_for: a bounded wait inside the scenario that runs out raises
        # TimeoutError too, and must be reported as itself, not as the overall limit.
        done, _ = await asyncio.wait({task}, timeout=time_limit_s(config))
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the lab cleans up on cancel
            res = ScenarioResult(name, config.seed, False, None,
                                 failures=[f"did not finish within {time_limit_s(config):g}s"])
        else:
            res = task.result()
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    except Exception as e:  # a scenario that breaks reports why; the CLI exits non-zero
        log.exception("scenario %s failed", name)
        res = ScenarioResult(name, config.seed, False, None, failures=[f"{type(e).__name__}: {e}"])
    res.elapsed_s = time.monotonic() - t0
    res.workdir = str(config.workdir)
    if res.report is not None:
        # Every scenario reports what its jobs did, beside its own figures.
        for key in SIDE_EFFECT_FIGURES:
            if key in res.report.counts:
                res.figures.setdefault(key, res.report.counts[key])
    if config.factory_env:
        res.notes.append("factories ran with " + " ".join(f"{k}={v}" for k, v in sorted(config.factory_env.items())))
    res.ok = res.ok and not res.failures and (res.report is not None and res.report.ok)
    return res
