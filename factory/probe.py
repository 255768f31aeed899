"""Capability probe: what this machine offers to jobs, as capability tokens.

The tokens follow the offer grammar of :mod:`gigafactory.schemas.capabilities` (``key`` or
``key:value``, lower-case) and every one is validated with ``parse_offer`` before it leaves
this module, so a factory can never register a token the router cannot parse.

What is probed:

- ``os:linux|mac|windows`` and ``arch:x86_64|arm64`` (``aarch64`` and ``amd64`` normalized);
- ``engine:<name>`` (and ``<name>:<version>``) for each registered engine (:mod:`engines`)
  whose own probe says it can run here: ``engine:shell`` is built in (on Windows only when bash
  or sh exists); opt-in engines (``noop``) are offered only by ``--cap``; engines declared in
  the engines folder (:mod:`engines.declared`) are probed like the built-in ones, and each
  declaration file that was refused is logged with why;
- ``has:<tool>`` for agent CLIs and tools found on the search path;
- ``node:<v>``, ``python:<v>``, ``git:<v>``, ``go:<v>`` read from the tools' version output,
  each run with a hard timeout in its own process group; a tool that hangs, fails or prints
  something unexpected is simply not versioned (the probe never raises for a broken tool);
- ``gpu:nvidia`` and ``gpu-count:<n>`` when ``nvidia-smi -L`` lists GPUs, ``gpu:apple`` on
  arm64 macs;
- ``cred:<name>`` for well-known credential variables that are set and non-empty. Only the
  presence is reported: a value never leaves this module.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from gigafactory import osproc
from gigafactory.schemas.capabilities import CapabilityError, parse_offer

from . import engines
from .credentials import CREDENTIAL_VARS

PROBE_TIMEOUT_S = 30.0
"""Default hard limit for each version command of the probe (setting ``probe_timeout_s``):
an agent CLI's ``--version`` takes several seconds on a loaded machine (Gemini CLI's was seen
at 9 s), and a CLI that misses it is not offered at all."""

log = logging.getLogger(__name__)

# Agent CLIs and tools reported as ``has:<token>`` when found on the search path.
TOOLS: dict[str, str] = {
    "claude": "claude",
    "codex": "codex",
    "aider": "aider",
    "gemini": "gemini",
    "copilot": "copilot",
    "git": "git",
    "docker": "docker",
    "node": "node",
    "npm": "npm",
    "python3": "python3",
    "go": "go",
    "cargo": "cargo",
    "xcodebuild": "xcode",
    "nvidia-smi": "nvidia-smi",
}

# Version tokens: token key -> (executable, arguments). ``go`` has no ``--version`` flag
# (it prints "flag provided but not defined"), so it is asked with ``go version``.
VERSIONED: dict[str, tuple[str, tuple[str, ...]]] = {
    "node": ("node", ("--version",)),
    "python": ("python3", ("--version",)),
    "git": ("git", ("--version",)),
    "go": ("go", ("version",)),
}


_VERSION_IN_TEXT_RE = re.compile(r"(?<![\d.])v?(\d+(?:\.\d+)+)")
_NVIDIA_GPU_LINE_RE = re.compile(r"^GPU \d+:", re.MULTILINE)
_TOKEN_CHARS_RE = re.compile(r"[^a-z0-9_.\-/]")

# After a tool is killed, how long we wait for it to be reaped and its pipe to close.
_REAP_TIMEOUT_S = 2.0
# Version output is one line; anything longer than this is not what we asked for.
_OUTPUT_LIMIT_CHARS = 4096


def normalize_os(sys_platform: str) -> str:
    """``sys.platform`` -> ``linux``, ``mac``, ``windows``, or the platform name lower-cased."""
    p = sys_platform.lower()
    if p.startswith("linux"):
        return "linux"
    if p == "darwin":
        return "mac"
    if p in ("win32", "cygwin", "msys"):
        return "windows"
    return _TOKEN_CHARS_RE.sub("", p) or "unknown"


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` -> ``x86_64`` or ``arm64`` (``aarch64``/``amd64`` normalized)."""
    m = machine.strip().lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("arm64", "aarch64", "armv8", "arm64e"):
        return "arm64"
    return _TOKEN_CHARS_RE.sub("", m) or "unknown"


def platform_tokens(os_name: str, arch: str) -> list[str]:
    """The tokens that follow from the platform alone: os, arch, and ``gpu:apple``."""
    out = [f"os:{os_name}", f"arch:{arch}"]
    if os_name == "mac" and arch == "arm64":
        # Every Apple-silicon mac has a Metal GPU; there is no tool to ask.
        out.append("gpu:apple")
    return out


def parse_tool_version(text: str) -> str | None:
    """The first dotted version in a tool's version output, or None.

    ``'v20.11.1'`` -> ``'20.11.1'``; ``'git version 2.43.0'`` -> ``'2.43.0'``;
    ``'go version go1.22.1 linux/amd64'`` -> ``'1.22.1'``; ``'Python 3.11.7'`` -> ``'3.11.7'``.
    """
    m = _VERSION_IN_TEXT_RE.search(text[:_OUTPUT_LIMIT_CHARS])
    return m.group(1) if m else None


def count_nvidia_gpus(text: str) -> int:
    """The number of ``GPU <n>: ...`` lines in ``nvidia-smi -L`` output."""
    return len(_NVIDIA_GPU_LINE_RE.findall(text))


def describe() -> dict:
    """Host name, os and arch of this machine, for the factory record."""
    return {
        "host": socket.gethostname(),
        "os": normalize_os(sys.platform),
        "arch": normalize_arch(platform.machine()),
    }


def probe(
    extra: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    path: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> list[str]:
    """Probe this machine and return its capability tokens, sorted and deduplicated.

    :param extra: tokens added by the operator (``key`` or ``key:value``); a token that does
        not follow the grammar raises :class:`ValueError` naming it.
    :param environ: the environment the engines will run with; credentials are looked up here
        (default: ``os.environ``).
    :param path: the search path for tools (default: ``PATH`` of ``environ``).
    :param timeout_s: hard limit for each version command; the engines' commands run in
        parallel, then the tools', so the probe takes about twice ``timeout_s`` at worst.
    """
    if timeout_s <= 0:
        raise ValueError(f"probe timeout_s must be positive, got {timeout_s!r}")
    extra_tokens = [_normalize_extra(t) for t in extra]
    env = dict(os.environ if environ is None else environ)
    search_path = path if path is not None else env.get("PATH", os.defpath)
    # The version commands run with the probed search path, so a tool's own helpers resolve
    # the way they will for an engine.
    tool_env = {**env, "PATH": search_path}

    host = describe()
    tokens: set[str] = set(platform_tokens(host["os"], host["arch"]))

    found = {exe: shutil.which(exe, path=search_path) for exe in TOOLS}
    tokens.update(f"has:{TOOLS[exe]}" for exe, where in found.items() if where)

    tokens.update(engine_tokens(environ=tool_env, path=search_path, timeout_s=timeout_s))

    commands: dict[str, list[str]] = {}
    for key, (exe, args) in VERSIONED.items():
        if found[exe]:
            commands[key] = [found[exe], *args]
    if found["nvidia-smi"]:
        commands["nvidia-smi"] = [found["nvidia-smi"], "-L"]
    outputs = _run_all(commands, tool_env, timeout_s)

    versions = {key: parse_tool_version(outputs.get(key) or "") for key in VERSIONED}
    if versions["python"] is None:
        # No usable python3 on the path: the interpreter running the factory is still one.
        versions["python"] = "{}.{}.{}".format(*sys.version_info[:3])
    tokens.update(f"{key}:{v}" for key, v in versions.items() if v)

    gpus = count_nvidia_gpus(outputs.get("nvidia-smi") or "")
    if gpus > 0:
        tokens.update(("gpu:nvidia", f"gpu-count:{gpus}"))

    tokens.update(f"cred:{name.lower()}" for name in CREDENTIAL_VARS if env.get(name))
    tokens.update(extra_tokens)

    for t in tokens:
        # Every token, probed or not, must be one the router can parse.
        parse_offer(t)
    return sorted(tokens)


def engine_tokens(*, environ: Mapping[str, str], path: str, timeout_s: float) -> list[str]:
    """``engine:<name>`` (and ``<name>:<version>``) for every registered engine
    (:func:`engines.registry`) whose own probe says it can run here, except the opt-in ones
    (``noop``), which only an operator's ``--cap engine:<name>`` offers. An engine whose probe
    raises is not offered, and is logged: one broken engine never breaks the probe.

    :param environ: the environment engines will run with (credentials are looked up here).
    :param path: the search path for the engines' programs.
    :param timeout_s: hard limit for each engine's version command.
    """
    out: list[str] = []
    probed = [eng for eng in engines.registry().values() if not eng.opt_in]

    def one(eng):
        try:
            return eng.probe(environ=environ, path=path, timeout_s=timeout_s)
        except Exception:  # noqa: BLE001 - a broken engine must not break the probe
            log.exception("probing engine %s failed; it is not offered", eng.name)
            return None

    # In parallel: an agent CLI's `--version` starts a whole Node.js or Python program (seconds
    # each on a busy machine), so one after another the probe would take their sum.
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(probed)))) as pool:
        results = list(pool.map(one, probed))
    for eng, found in zip(probed, results):
        if found is None:
            continue
        if found.runnable:
            toks = [*eng.tokens(found), f"engine-class:{eng.engine_class}"]  # for engine-class jobs
            try:
                for t in toks:
                    parse_offer(t)
            except CapabilityError as e:
                # A declared engine's version comes from the operator's regex: never let one
                # token that the router cannot parse break the whole probe.
                log.error("engine %s is not offered: its capability token is not valid (%s)", eng.name, e)
                continue
            out.extend(toks)
        else:
            log.info("engine %s is not offered: %s", eng.name, found.why or "its probe says it cannot run here")
    for why in engines.declaration_errors().values():
        log.error("declared engine not offered: %s", why)
    return out


def _normalize_extra(token: object) -> str:
    try:
        key, value = parse_offer(token)  # type: ignore[arg-type]
    except CapabilityError as e:
        raise CapabilityError(f"extra capability {token!r} is not valid: {e}") from e
    return key if value is None else f"{key}:{value}"


def _run_all(commands: Mapping[str, list[str]], env: Mapping[str, str], timeout_s: float) -> dict[str, str | None]:
    """Run every command in parallel, each bounded by ``timeout_s``; key -> output or None."""
    if not commands:
        return {}
    with ThreadPoolExecutor(max_workers=len(commands), thread_name_prefix="gf-probe") as pool:
        futures = {key: pool.submit(_run_tool, argv, env, timeout_s) for key, argv in commands.items()}
        return {key: f.result() for key, f in futures.items()}


def _run_tool(argv: list[str], env: Mapping[str, str], timeout_s: float) -> str | None:
    """stdout+stderr of a short command that exited 0, or None. Never raises."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            # Its own group, so a tool that hangs is killed with everything it started.
            **osproc.new_group_popen_kwargs(),
        )
    except OSError:
        return None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tool(proc)
        return None
    except Exception:  # noqa: BLE001 - a broken tool must not break the probe
        _kill_tool(proc)
        return None
    if proc.returncode != 0:
        return None
    return out.decode("utf-8", errors="replace")[:_OUTPUT_LIMIT_CHARS]


def _kill_tool(proc: subprocess.Popen) -> None:
    osproc.signal_group(proc.pid, osproc.SIGKILL)  # Windows: the tree
    try:
        proc.communicate(timeout=_REAP_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - something outside the group holds the pipe open
        if proc.stdout is not None:
            proc.stdout.close()
        try:
            proc.wait(timeout=_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
