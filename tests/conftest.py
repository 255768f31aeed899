"""Fixtures shared by the tests that cross the broker: a real ``nats-server`` per test, on a
free loopback port, with its store and log under the test's ``tmp_path``."""

from __future__ import annotations

import logging

import pytest

from gigafactory.embedded import EmbeddedServer

# nats-py logs every reconnect attempt at INFO; keep test output to what matters.
logging.getLogger("nats").setLevel(logging.WARNING)


def _start(root) -> EmbeddedServer:
    root.mkdir(parents=True, exist_ok=True)
    return EmbeddedServer(store_dir=str(root / "store"), log_file=str(root / "nats-server.log")).start()


@pytest.fixture
def nats_server(tmp_path):
    """A fresh JetStream server for one test (port 0: the OS picks a free one)."""
    srv = _start(tmp_path / "nats")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def module_nats_server(tmp_path_factory):
    """One server shared by a module whose tests each use their own jobs (the CLI tests,
    which pay for starting real coordinator and factory processes once)."""
    srv = _start(tmp_path_factory.mktemp("nats"))
    try:
        yield srv
    finally:
        srv.stop()
