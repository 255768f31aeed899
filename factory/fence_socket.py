"""The per-attempt fence endpoint: how a job runs ``gigafactory fence`` without any broker
credential (issue 12, "Secrets"; issue 8, the fence before a push).

The factory serves, for each attempt it runs, a Unix domain socket in a folder of that attempt
alone (mode 0700, the socket 0600; its path in ``GF_FENCE_SOCKET``). On it the factory accepts one
question only: "renew (this job, this epoch, this factory) with at least S seconds of lease
left". It performs the compare-and-set renewal itself, through its holder's fenced write (signed
as all its holder writes), and answers the verdict. The job never holds the factory's identity,
so it can renew only its own lease, only while its attempt runs.

Bounds: a request is one JSON line of at most :data:`FENCE_REQUEST_MAX_BYTES`; it must arrive
within :data:`FENCE_REQUEST_TIMEOUT_S`; one request at a time per socket (a second one meanwhile
is answered ``unknown``, never queued); the renewal itself is bounded by the caller's timeout.
The socket and its folder are removed when the attempt ends; a request naming another job,
epoch or factory is refused, and so is every request once the attempt's epoch is not current.

The wire format (one line each way, JSON):

- request: ``{"job": str, "epoch": int, "factory": str, "min_remaining_s": float | null}``
- answer: ``{"outcome": "held" | "too_late" | "fenced" | "unknown" | "usage", "reason": str, ...}``
  with ``remaining_s``, ``min_remaining_s``, ``read_revision``, ``revision`` when known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

log = logging.getLogger(__name__)

FENCE_SOCKET_ENV = "GF_FENCE_SOCKET"
"""The variable a job finds its attempt's fence socket in."""

FENCE_REQUEST_MAX_BYTES = 1024
"""Largest request line accepted (a job id, an epoch, a factory id and a number fit many times)."""

FENCE_REQUEST_TIMEOUT_S = 5.0
"""How long the factory waits for a connected client's request line before hanging up."""

FENCE_SOCKET_PATH_MAX_BYTES = 100
"""Longest socket path used (the kernel's limit for ``sun_path`` is 108 bytes with its NUL)."""

OUTCOMES: tuple[str, ...] = ("held", "too_late", "fenced", "unknown", "usage")
"""What an answer may say: renewed with enough lease left; renewed with too little left; not
the holder (another epoch, job or factory, or the attempt is over); cannot tell; a bad request."""


class FenceRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What a job asks on its fence socket.

    :param job: the job id (``GF_JOB_ID``).
    :param epoch: the attempt's epoch (``GF_EPOCH``).
    :param factory: the holder it believes it runs on (``GF_FACTORY``).
    :param min_remaining_s: the lease that must be left after the renewal (None: half the TTL).
    """

    job: str
    epoch: int
    factory: str
    min_remaining_s: float | None = None


class FenceRequestError(ValueError):
    """A request that is not a :class:`FenceRequest` line (the message says what was wrong)."""


def parse_request(line: bytes) -> FenceRequest:
    """The request in ``line`` (one JSON line). Raises :class:`FenceRequestError` naming the
    problem: too long, not JSON, a missing or mistyped field.

    :param line: the bytes read, with or without the trailing newline."""
    if len(line) > FENCE_REQUEST_MAX_BYTES:
        raise FenceRequestError(f"fence request of {len(line)} bytes, more than {FENCE_REQUEST_MAX_BYTES}")
    try:
        return msgspec.json.decode(line.strip(), type=FenceRequest)
    except msgspec.DecodeError as e:
        raise FenceRequestError(f"fence request is not {{job, epoch, factory, min_remaining_s}} JSON: {e}") from None


def mismatch(req: FenceRequest, job: str, epoch: int, factory: str) -> str | None:
    """Why ``req`` does not name this socket's attempt (None when it does): a socket answers only
    for the (job, epoch) it was made for, on the factory that made it.

    :param req: the request.
    :param job: the attempt's job.
    :param epoch: its epoch.
    :param factory: the factory running it."""
    if req.job != job:
        return f"this fence socket serves job {job}, not {req.job}"
    if req.epoch != epoch:
        return f"stale epoch {req.epoch}: this fence socket serves epoch {epoch} of {job}"
    if req.factory != factory:
        return f"{req.factory} does not hold {job}: {factory} runs epoch {epoch}"
    return None


Verdict = dict
"""An answer: ``outcome`` (one of :data:`OUTCOMES`), ``reason``, and what else is known."""

Renew = Callable[[float | None], Awaitable[Verdict]]
"""The factory's renewal for the attempt: ``min_remaining_s`` in, the verdict out."""


SWEEP_MAX_ENTRIES = 10_000
"""Most entries of a temporary folder a factory looks through at start for the socket folders
of dead factories (:func:`sweep_stale_folders`): a bounded start, whatever else is there."""

_FOLDER = re.compile(r"gf-fence-(\d+)-")


def _prefix() -> str:
    """The folder name's start: it names the process that serves the socket, so that a later
    factory can tell the folders a SIGKILLed one left behind (:func:`sweep_stale_folders`)."""
    return f"gf-fence-{os.getpid()}-"


def socket_folder(base: str | None = None) -> str:
    """A fresh folder (mode 0700) for one attempt's socket, under ``base`` or the temporary
    folder; ``/tmp`` when that path would make the socket's too long for the kernel.

    :param base: where to make it (None: :func:`tempfile.gettempdir`)."""
    base = base or tempfile.gettempdir()
    prefix = _prefix()
    if len(os.fsencode(os.path.join(base, prefix + "XXXXXXXX", "fence.sock"))) > FENCE_SOCKET_PATH_MAX_BYTES:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)  # mkdtemp: 0700, a name nobody else has


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _served(path: str) -> bool:
    """Whether something answers on the socket at ``path``: a folder whose process looks dead
    may be a live factory's in another pid namespace sharing this folder. Only a refused
    connection (or no socket at all) says nobody does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot tell (permissions, a timeout): keep it
    finally:
        s.close()
    return True


_swept = False


def sweep_stale_folders_once() -> int:
    """:func:`sweep_stale_folders` at the first call in this process (a fleet host starts
    many factories; one look is enough), then 0."""
    global _swept
    if _swept:
        return 0
    _swept = True
    return sweep_stale_folders()


def sweep_stale_folders(bases: list[str] | None = None) -> int:
    """Remove the socket folders that factories killed without their clean-up (SIGKILL, a
    power loss) left in ``bases``: those whose process is gone and whose socket nobody serves.
    Harmless but never swept otherwise, they pile up in ``/tmp`` one per interrupted attempt.
    Folders of the older naming (no process id) are left alone: nothing says whose they are.
    Looks through at most :data:`SWEEP_MAX_ENTRIES` entries per folder. Blocking: call it off
    the event loop.

    :param bases: the folders to look in (None: the temporary folder and ``/tmp``, where
        :func:`socket_folder` makes them).
    :returns: how many folders were removed."""
    removed = 0
    for base in dict.fromkeys(bases or [tempfile.gettempdir(), "/tmp"]):
        try:
            entries = os.scandir(base)
        except OSError:
            continue
        with entries:
            for n, entry in enumerate(entries):
                if n >= SWEEP_MAX_ENTRIES:
                    break
                m = _FOLDER.match(entry.name)
                if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False) or _served(os.path.join(entry.path, "fence.sock")):
                        continue
                except OSError:
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += not os.path.lexists(entry.path)
    return removed


@dataclass
class FenceSocket:
    """One attempt's fence endpoint (:func:`serve`).

    :param path: the socket's path (``GF_FENCE_SOCKET``).
    :param folder: its folder (removed with it).
    """

    path: str
    folder: str
    server: asyncio.AbstractServer | None = None
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def close(self) -> None:
        """Stop answering and remove the socket and its folder (the attempt is over)."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
        # On a worker thread: removing a folder waits on the file system (a noop run's profile
        # showed it as a tenth of a fleet host's loop), and the loop serves every other run.
        await asyncio.to_thread(_remove_folder, self.path, self.folder)


def _remove_folder(path: str, folder: str) -> None:
    """Remove the socket at ``path`` and its ``folder``: two calls when the folder holds only
    the socket (half the CPU of ``shutil.rmtree``), the whole tree when something else was put
    there (an engine run as the folder's owner may have)."""
    try:
        os.unlink(path)
        os.rmdir(folder)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)


async def serve(renew: Renew, *, job: str, epoch: int, factory: str, renew_timeout_s: float,
                base: str | None = None, owner: tuple[int, int] | None = None) -> FenceSocket:
    """Serve the fence socket of one attempt.

    :param renew: the factory's renewal of this attempt's lease (called for a matching request).
    :param job: the attempt's job.
    :param epoch: its epoch.
    :param factory: the factory's id.
    :param renew_timeout_s: how long a renewal may take before the answer is ``unknown``.
    :param base: where to make the socket's folder (:func:`socket_folder`).
    :param owner: ``(uid, gid)`` to give the folder and socket to (an engine run as another
        user, the ``user`` sandbox); None: the factory's own user only.
    """
    folder = await asyncio.to_thread(socket_folder, base)  # off the loop, as its removal
    sock = FenceSocket(os.path.join(folder, "fence.sock"), folder)

    async def answer(writer: asyncio.StreamWriter, verdict: Verdict) -> None:
        writer.write(msgspec.json.encode(verdict) + b"\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), FENCE_REQUEST_TIMEOUT_S)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if sock.busy.locked():  # one at a time: never a queue of renewals behind a slow one
                await answer(writer, {"outcome": "unknown", "reason": "another fence request is in progress on "
                                                                      "this socket; ask again after it"})
                return
            async with sock.busy:
                try:
                    line = await asyncio.wait_for(reader.readline(), FENCE_REQUEST_TIMEOUT_S)
                    req = parse_request(line)
                except (ValueError, asyncio.LimitOverrunError) as e:  # readline's over-limit is a ValueError
                    await answer(writer, {"outcome": "usage", "reason": str(e)[:500]})
                    return
                except asyncio.TimeoutError:
                    await answer(writer, {"outcome": "usage",
                                          "reason": f"no fence request line within {FENCE_REQUEST_TIMEOUT_S:g}s"})
                    return
                wrong = mismatch(req, job, epoch, factory)
                if wrong is not None:
                    await answer(writer, {"outcome": "fenced", "reason": wrong})
                    return
                try:
                    verdict = await asyncio.wait_for(renew(req.min_remaining_s), renew_timeout_s)
                except asyncio.TimeoutError:
                    verdict = {"outcome": "unknown", "reason": f"the renewal took more than {renew_timeout_s:g}s"}
                await answer(writer, verdict)
        except Exception:
            log.exception("fence socket of %s epoch %s: request failed", job, epoch)
        finally:
            writer.close()

    try:
        sock.server = await asyncio.start_unix_server(handle, path=sock.path, limit=FENCE_REQUEST_MAX_BYTES)
        os.chmod(sock.path, 0o600)
        if owner is not None:
            os.chown(folder, *owner)
            os.chown(sock.path, *owner)
    except BaseException:
        await sock.close()
        raise
    return sock


async def ask(path: str, req: FenceRequest, timeout_s: float) -> Verdict:
    """Ask the fence socket at ``path`` (the job's side); the factory's verdict. Raises OSError
    (no such socket: the attempt is over) or :class:`asyncio.TimeoutError`.

    :param path: ``GF_FENCE_SOCKET``.
    :param req: the question.
    :param timeout_s: the whole exchange's bound."""
    async def exchange() -> Verdict:
        reader, writer = await asyncio.open_unix_connection(path, limit=64 * 1024)
        try:
            writer.write(msgspec.json.encode(req) + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        got = msgspec.json.decode(line) if line.strip() else {}
        if not isinstance(got, dict) or got.get("outcome") not in OUTCOMES:
            return {"outcome": "unknown", "reason": f"the fence socket gave no verdict ({line[:200]!r})"}
        return got

    return await asyncio.wait_for(exchange(), timeout_s)


__all__ = ["FENCE_REQUEST_MAX_BYTES", "FENCE_REQUEST_TIMEOUT_S", "FENCE_SOCKET_ENV", "FenceRequest",
           "FenceRequestError", "FenceSocket", "OUTCOMES", "ask", "mismatch", "parse_request", "serve"]
