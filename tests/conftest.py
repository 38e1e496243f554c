"""Shared fixtures: a real nats-server, a fake OpenAI upstream (a real HTTP
server), and real clawbus gateway/worker processes on free loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import uvloop
from nats.aio.client import Client

from clawbus.natsserver import NatsServer
from tests.fakes.openai_upstream import FakeOpenAI
from tests.natsfixtures import nats_cluster, nats_server, shared_nats  # noqa: F401
from tests.procs import Gateway, Worker, write_config

TOKEN = "test-token-123"


def base_config(upstream: FakeOpenAI | None, **bus: Any) -> dict[str, Any]:
    """A config with the endpoint on, two agents on the fake upstream, short bus timers."""
    providers: dict[str, Any] = {"echo": {"api": "echo"}}
    model = "echo/echo"
    if upstream is not None:
        providers["fake"] = {"api": "openai-completions", "baseUrl": upstream.base_url,
                             "apiKey": "sk-upstream", "timeoutSeconds": 5,
                             "connectTimeoutSeconds": 2}
        model = "fake/gpt-test"
    return {
        "gateway": {"auth": {"token": TOKEN}, "keepaliveSeconds": 0.3,
                    "http": {"endpoints": {"chatCompletions": {"enabled": True}}}},
        "agents": {
            "defaults": {"model": model, "timeoutSeconds": 30},
            "list": [{"id": "main", "default": True, "systemPrompt": "You are main."},
                     {"id": "beta", "systemPrompt": "You are beta."}],
        },
        "models": {"providers": providers},
        "bus": {"queueTimeoutSeconds": 5, "heartbeatSeconds": 1, "ackWaitSeconds": 6, **bus},
    }


@dataclass
class Stack:
    """Processes sharing one NATS of their own (so stacks with different configs
    never serve each other's runs): gateways, workers and the fake upstream."""

    nats: NatsServer
    upstream: FakeOpenAI
    config: Path
    gateways: list[Gateway] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, upstream: FakeOpenAI, config: dict[str, Any], *,
              gateways: int = 1, workers: int = 1) -> Stack:
        nats = NatsServer(store_dir=directory / "nats").start()
        st = cls(nats, upstream, write_config(directory / "clawbus.json5", config))
        try:
            for _ in range(gateways):
                st.add_gateway()
            for _ in range(workers):
                st.add_worker()
        except BaseException:
            st.stop()
            raise
        return st

    @property
    def url(self) -> str:
        return self.gateways[0].url

    def add_gateway(self) -> Gateway:
        gw = Gateway(self.config, self.nats.url, name=f"gateway{len(self.gateways)}")
        self.gateways.append(gw)
        return gw

    def add_worker(self, grace: float = 10.0) -> Worker:
        wk = Worker(self.config, self.nats.url, grace=grace, name=f"worker{len(self.workers)}")
        self.workers.append(wk)
        return wk

    def stop(self) -> None:
        for proc in [*self.workers, *self.gateways]:
            proc.stop()
        self.nats.stop()


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
async def nc(shared_nats: NatsServer) -> AsyncIterator[Client]:  # noqa: F811 (a fixture)
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
