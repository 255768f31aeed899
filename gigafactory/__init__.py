"""Gigafactory: run fleets of coding agents over NATS JetStream.

The Python API is the client (:mod:`gigafactory.client`)::

    from gigafactory import Client

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        [job] = await client.submit_text(text, path="hello.md")
        final = await client.wait([job.job], timeout_s=600)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gigafactory.version import __version__

__all__ = ["ApiError", "Client", "JobFile", "JobSummary", "NoCoordinator", "__version__"]

_CLIENT_NAMES = frozenset({"ApiError", "Client", "JobFile", "JobSummary", "NoCoordinator"})

if TYPE_CHECKING:
    from gigafactory.client import ApiError, Client, JobFile, JobSummary, NoCoordinator


def __getattr__(name: str):
    # The client is loaded on first use: importing another part of the package (a schema, the
    # factory, the supervisor's helpers) does not load nats-py and the API's types with it.
    if name in _CLIENT_NAMES:
        from gigafactory import client

        return getattr(client, name)
    raise AttributeError(f"module 'gigafactory' has no attribute {name!r}")
