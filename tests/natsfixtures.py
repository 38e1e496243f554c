"""Pytest fixtures that run real ``nats-server`` processes (see :mod:`clawbus.natsserver`).

``tests/conftest.py`` imports them. Every fixture stops its processes in ``finally``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from clawbus.natsserver import NatsServer, cluster


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh single JetStream server with its own store dir, for one test."""
    server = NatsServer(tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server for the whole session (tests must use unique stream names)."""
    server = NatsServer(tmp_path_factory.mktemp("shared-nats"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """A 3-node JetStream cluster on loopback (nodes n1..n3).

    The nodes accept clients, but JetStream may still be electing its meta
    leader: await ``clawbus.natsserver.wait_jetstream_ready`` before creating streams.
    """
    servers: list[NatsServer] = []
    try:
        servers = cluster(3, tmp_path / "cluster")
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.asynccontextmanager
async def scratch_stream(nc: Client, tag: str, **config: Any) -> AsyncIterator[str]:
    """A memory stream of its own on a shared server, deleted afterwards: its name
    is ``tag`` + random letters, its subjects ``<name lowercased>.>``."""
    name = f"{tag}{uuid.uuid4().hex[:10].upper()}"
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"], storage="memory", **config)
    try:
        yield name
    finally:
        await js.delete_stream(name)
