"""Reading the business signals (thin I/O around :func:`economics.budget.parse_signals`).

The operator configures a file (``budget_signals_file``) or a command
(``budget_signals_command``, which wins); with neither, the reading is neutral (every factor
1) and says so. A document larger than ``budget_signals_max_bytes`` and a command slower than
``budget_signals_timeout_s`` are errors that name the setting."""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

from .budget import Signals, SignalsError, parse_signals


async def read_signals(settings) -> Signals:
    """One reading, now.

    :param settings: the coordinator's :class:`~gigafactory.config.Settings`.
    :raises SignalsError: the source cannot be read or its document is bad (the message says which).
    """
    now = time.time()
    limit = settings.budget_signals_max_bytes
    if settings.budget_signals_command:
        argv = shlex.split(settings.budget_signals_command)
        raw = await _run(argv, settings.budget_signals_timeout_s, limit)
        return parse_signals(raw, f"command:{argv[0]}", now)
    if settings.budget_signals_file:
        path = Path(settings.budget_signals_file)
        source = f"file:{path}"
        try:
            with path.open("rb") as fh:
                raw = fh.read(limit + 1)
        except OSError as e:
            raise SignalsError(f"{source} (GIGAFACTORY_BUDGET_SIGNALS_FILE): cannot read it: {e}") from None
        if len(raw) > limit:
            raise SignalsError(f"{source}: larger than budget_signals_max_bytes ({limit} bytes, "
                               "GIGAFACTORY_BUDGET_SIGNALS_MAX_BYTES): shorten it or raise the limit")
        return parse_signals(raw, source, now)
    return Signals(source="none", read_at_s=now)


async def _run(argv: list[str], timeout_s: float, limit: int) -> bytes:
    source = f"command:{argv[0] if argv else ''} (GIGAFACTORY_BUDGET_SIGNALS_COMMAND)"
    if not argv:
        raise SignalsError(f"{source}: empty command")
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    except OSError as e:
        raise SignalsError(f"{source}: cannot start it: {e}") from None
    try:
        raw = await asyncio.wait_for(proc.stdout.read(limit + 1), timeout_s)
        if len(raw) > limit:
            raise SignalsError(f"{source}: printed more than budget_signals_max_bytes ({limit} bytes)")
        rc = await asyncio.wait_for(proc.wait(), timeout_s)
    except asyncio.TimeoutError:
        raise SignalsError(f"{source}: no answer within budget_signals_timeout_s ({timeout_s:g} s)") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if rc != 0:
        raise SignalsError(f"{source}: exited {rc}")
    return raw
