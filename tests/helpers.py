"""Helpers the tests import (``tests/conftest.py`` holds only fixtures and hooks):
the test token and config, a :class:`Stack` of real processes on a NATS of its
own, and whether a Docker engine answers (for the container-backed tests)."""

from __future__ import annotations

import asyncio
import functools
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson

from clawbus.natsserver import NatsServer
from tests.fakes.openai_upstream import FakeOpenAI
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
    never serve each other's runs): gateways, workers and the fake upstream.

    The NATS is always a local ``nats-server`` process, whatever
    ``CLAWBUS_TEST_NATS`` says (see ``tests/natsfixtures.py``)."""

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


@functools.cache
def docker_engine_problem() -> str | None:
    """None when a Docker engine answers a ping (asked the way testcontainers asks:
    ``DOCKER_HOST``, the Docker context, ``~/.testcontainers.properties``), else why not.

    Asked once per session. A failed ping leaves an unclosed socket behind in the
    Docker SDK: it is collected here, with its ResourceWarning ignored, so that it
    does not fail whichever test happens to run the garbage collector next."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            from testcontainers.core.docker_client import DockerClient
        except ImportError as exc:
            return f"testcontainers is not installed ({exc}): pip install -e '.[test]'"
        try:
            client = DockerClient(timeout=5)
            try:
                client.client.ping()
            finally:
                client.client.close()
        except Exception as exc:  # the SDK raises DockerException, requests' errors, OSError
            problem: str | None = f"{type(exc).__name__}: {exc}"
        else:
            problem = None
        gc.collect()
    return problem


async def eventually(predicate: Callable[[], bool], within: float) -> None:
    """Until ``predicate()`` holds: state of other processes or of a subscription's
    callback, with no event to await (``within`` seconds at most)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.02)


def sdk_client(url: str) -> openai.OpenAI:
    """The official SDK against a gateway at ``url`` (no retries: the tests judge)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def sdk_turn(url: str, user: str, text: str) -> str:
    """One non-streaming turn of the session of ``user``; the reply's text."""
    with sdk_client(url) as c:
        reply = c.chat.completions.create(model="openclaw", user=user,
                                          messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def seen_by_upstream(upstream: FakeOpenAI, text: str) -> list[dict[str, str]]:
    """The conversation the model was given on the turn that sent ``text``."""
    (rec,) = [r for r in upstream.requests if text in orjson.dumps(r.body).decode()]
    return list(rec.body["messages"][1:])  # after the system prompt
