"""Fixtures shared by the tests that cross the broker: a real ``nats-server`` per test, on a
free loopback port, with its store and log under the test's ``tmp_path``."""

from __future__ import annotations

import logging

import pytest

from gigafactory.embedded import EmbeddedServer
from gigafactory.testing import broker_kind, docker_broker, lab_identities, use_creds

# nats-py logs every reconnect attempt at INFO; keep test output to what matters.
logging.getLogger("nats").setLevel(logging.WARNING)


class _DockerBroker:
    """A nats container run by testcontainers (GIGAFACTORY_TEST_BROKER=docker)."""

    def __init__(self, url: str) -> None:
        self.url = url


def _serve(root):
    """A server with authentication on (the default of every broker Gigafactory starts): its
    identity store is ``srv.identities`` (admin, coordinator, factory-local; a test enrols more
    with ``srv.identities.create`` and :meth:`EmbeddedServer.reload`), and the test, with every
    process it starts, connects as ``admin`` through ``GIGAFACTORY_CREDS``."""
    if broker_kind() == "docker":
        with docker_broker() as url:
            yield _DockerBroker(url)
        return
    root.mkdir(parents=True, exist_ok=True)
    ids = lab_identities(root)
    srv = EmbeddedServer(store_dir=str(root / "store"), log_file=str(root / "nats-server.log"),
                         users=ids.users()).start()
    srv.identities = ids
    try:
        with use_creds(ids.creds_path("admin")):
            yield srv
    finally:
        srv.stop()


@pytest.fixture
def nats_server(tmp_path):
    """A fresh JetStream server for one test (port 0: the OS picks a free one)."""
    yield from _serve(tmp_path / "nats")


@pytest.fixture(scope="module")
def module_nats_server(tmp_path_factory):
    """One server shared by a module whose tests each use their own jobs (the CLI tests,
    which pay for starting real coordinator and factory processes once)."""
    yield from _serve(tmp_path_factory.mktemp("nats"))
