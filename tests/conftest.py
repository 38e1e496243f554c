"""Shared fixtures and hooks: a real nats-server, a fake OpenAI upstream (a real
HTTP server), and real clawbus gateway/worker processes on free loopback ports.

Only fixtures and hooks live here; what tests import (the token, the config,
:class:`~tests.helpers.Stack`) is in ``tests/helpers.py``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
import uvloop
from nats.aio.client import Client

from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import Stack, base_config
from tests.natsfixtures import SingleNats, nats_cluster, nats_server, shared_nats  # noqa: F401

# Tracing is configured by the tests that want it, never by the caller's shell:
# an OTEL_EXPORTER_OTLP_ENDPOINT there would turn it on in every process started.
for _name in [name for name in os.environ if name.startswith("OTEL_")]:
    del os.environ[_name]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as up:
        yield up


@pytest.fixture(scope="module")
def stack(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two gateways and three workers on one NATS, against the fake upstream."""
    st = Stack.start(tmp_path_factory.mktemp("stack"), upstream, base_config(upstream),
                     gateways=2, workers=3)
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(autouse=True)
def _reset_upstream(request: pytest.FixtureRequest) -> None:
    """Every test starts with a well-behaved upstream."""
    if "upstream" in request.fixturenames or "stack" in request.fixturenames:
        up: FakeOpenAI = request.getfixturevalue("upstream")
        up.token_delay = 0.0
        up.fail_status = None
        up.garbage_after = None
        up.stall = False


@pytest.fixture
async def nc(shared_nats: SingleNats) -> AsyncIterator[Client]:  # noqa: F811 (a fixture)
    """A NATS client on the session's shared server (modules may override it)."""
    client = await nats.connect(shared_nats.url)
    try:
        yield client
    finally:
        await client.close()


def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item,
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop for every test; uvloop's too in modules that set ``BOTH_LOOPS``
    (code that must behave the same on the loop the product runs on)."""
    module = getattr(item, "module", None)
    if getattr(module, "BOTH_LOOPS", False):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
