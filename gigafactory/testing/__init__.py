"""Lab support, as ``temporalio.testing`` is for Temporal: brokers, clusters and processes for
tests, chaos scenarios and load runs. Nothing in a deployment imports this package.

- :func:`broker_url`, :func:`broker_kind`, :func:`docker_broker`: a broker for one test (here);
- :class:`Cluster`: a JetStream cluster of embedded brokers on loopback (:mod:`.cluster`);
- :class:`LabProc`, :func:`wait_for`: a lab's processes and bounded waits (:mod:`.procs`).

The default is a real ``nats-server`` subprocess on a free loopback port (the embedded
broker). Where a Docker engine answers, ``GIGAFACTORY_TEST_BROKER=docker`` runs the same
fixtures against a ``nats`` container through testcontainers instead; nothing is mocked
either way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from gigafactory.embedded import EmbeddedServer
from gigafactory.identity import CREDS_ENV, IdentityStore

from .cluster import Cluster, ClusterError
from .procs import LabProc, wait_for

__all__ = ["Cluster", "ClusterError", "LabProc", "broker_kind", "broker_url", "docker_available", "docker_broker",
           "lab_identities", "use_creds", "wait_for"]

NATS_IMAGE = os.environ.get("GIGAFACTORY_NATS_IMAGE", "nats:2.12-alpine")


def docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        import docker  # testcontainers depends on it

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def broker_kind() -> str:
    """``embedded`` (default) or ``docker`` (asked for with GIGAFACTORY_TEST_BROKER=docker)."""
    want = os.environ.get("GIGAFACTORY_TEST_BROKER", "embedded")
    if want not in ("embedded", "docker"):
        raise ValueError(f"GIGAFACTORY_TEST_BROKER={want!r}: expected 'embedded' or 'docker'")
    if want == "docker" and not docker_available():
        raise RuntimeError("GIGAFACTORY_TEST_BROKER=docker but no Docker engine answers; unset it to use "
                           "the embedded nats-server")
    return want


@contextlib.contextmanager
def docker_broker() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with DockerContainer(NATS_IMAGE).with_command("-js").with_exposed_ports(4222) as c:
        wait_for_logs(c, "Server is ready", timeout=30)
        yield f"nats://{c.get_container_host_ip()}:{c.get_exposed_port(4222)}"


def lab_identities(root: str | os.PathLike) -> IdentityStore:
    """An identity store for a lab broker under ``root`` (``admin``, ``coordinator``,
    ``factory-local``): what ``gigafactory up`` creates on first start. Pass its
    :meth:`~IdentityStore.users` to :class:`EmbeddedServer` to run it with authentication on,
    as every lab broker does by default."""
    store = IdentityStore(os.path.join(str(root), "identities"))
    store.ensure_defaults()
    return store


@contextlib.contextmanager
def use_creds(path: str | os.PathLike | None) -> Iterator[None]:
    """Set ``GIGAFACTORY_CREDS`` to ``path`` for the block (this process and the processes it
    starts), then restore it: how the fixtures give every connection of a test an identity."""
    before = os.environ.get(CREDS_ENV)
    if path is None:
        os.environ.pop(CREDS_ENV, None)
    else:
        os.environ[CREDS_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CREDS_ENV, None)
        else:
            os.environ[CREDS_ENV] = before


@contextlib.contextmanager
def broker_url(**kw) -> Iterator[str]:
    """A running broker for one test, by URL, with authentication on: the block runs as the
    lab's ``admin`` (``GIGAFACTORY_CREDS``). Tests that kill or restart the broker use
    :class:`EmbeddedServer` directly."""
    if broker_kind() == "docker":
        with docker_broker() as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="gf-nats-") as tmp:
        ids = lab_identities(tmp)
        srv = EmbeddedServer(store_dir=os.path.join(tmp, "store"), **{"users": ids.users(), **kw}).start()
        try:
            with use_creds(ids.creds_path("admin")):
                yield srv.url
        finally:
            srv.stop()
