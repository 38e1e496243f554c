"""The providers through the workers' HTTP client (workers/providers/http_client)
against two independent real HTTP/1.1 servers, aiohttp.web and uvicorn (h11), each
on a free loopback port, over plain HTTP and TLS: chunked and Content-Length
bodies, keep-alive reuse, a server closing an idle connection, and a real CONNECT
proxy (plain and TLS) in between.

The providers are built as a worker builds them: the trust store comes from
``SSL_CERT_FILE`` (a throwaway CA) and the proxy from ``HTTPS_PROXY``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import trustme

from bus.messages import Usage
from tests.fakes.connect_proxy import ConnectProxy
from tests.fakes.http_servers import SERVERS, TEXT, HTTPServer, answer, make_server
from workers.providers.anthropic_messages import AnthropicMessagesProvider
from workers.providers.base import (
    ChatMessage,
    Finish,
    Provider,
    ProviderError,
    ProviderRequest,
    TextDelta,
)
from workers.providers.http_client import HTTPClient
from workers.providers.openai_completions import OpenAICompletionsProvider

BOTH_LOOPS = True  # workers run uvloop


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CA's certificate, and the server's chain and key for 127.0.0.1, as files."""
    directory = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("127.0.0.1")
    files = {"ca": directory / "ca.pem", "chain": directory / "chain.pem",
             "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(files["chain"]), append=True)
    return files


@pytest.fixture
def server_tls(certs: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["chain"], certs["key"])
    return context


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, certs: dict[str, Path]) -> Iterator[None]:
    """No proxy but the test's own; the throwaway CA as the trust store."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    yield


@pytest.fixture(params=[(kind, scheme) for kind in SERVERS for scheme in ("http", "https")],
                ids=lambda p: f"{p[0]}-{p[1]}")
async def server(request: pytest.FixtureRequest, server_tls: ssl.SSLContext,
                 certs: dict[str, Path]) -> AsyncIterator[HTTPServer]:
    kind, scheme = request.param
    tls = server_tls if scheme == "https" else None
    async with make_server(kind, tls, (certs["chain"], certs["key"])) as running:
        yield running


@pytest.fixture(params=SERVERS)
async def https_server(request: pytest.FixtureRequest, server_tls: ssl.SSLContext,
                       certs: dict[str, Path]) -> AsyncIterator[HTTPServer]:
    async with make_server(request.param, server_tls,
                           (certs["chain"], certs["key"])) as running:
        yield running


def openai(server: HTTPServer) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(server.base_url, "sk-test", {"x-extra": "1"},
                                     timeout_seconds=10, connect_timeout_seconds=5)


def anthropic(server: HTTPServer) -> AnthropicMessagesProvider:
    return AnthropicMessagesProvider(server.base_url, "sk-ant", {},
                                     timeout_seconds=10, connect_timeout_seconds=5)


async def run(provider: Provider, model: str) -> tuple[str, Finish]:
    """The reply's text (however it was split) and its Finish."""
    request = ProviderRequest(model=model, system="Be brief.",
                              messages=(ChatMessage("user", "hi"),))
    text, finish = [], None
    async with contextlib.aclosing(provider.stream(request)) as items:
        async for item in items:
            if isinstance(item, TextDelta):
                text.append(item.text)
            else:
                assert isinstance(item, Finish) and finish is None
                finish = item
    assert finish is not None
    return "".join(text), finish


@contextlib.asynccontextmanager
async def closing(provider: Provider) -> AsyncIterator[Provider]:
    try:
        yield provider
    finally:
        await provider.aclose()


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_openai_stream(server: HTTPServer, framing: str) -> None:
    async with closing(openai(server)) as provider:
        assert await run(provider, f"gpt-{framing}") == (
            "".join(TEXT), Finish("stop", Usage(prompt_tokens=5, completion_tokens=4)))
    (seen,) = server.seen
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["x-extra"] == "1"
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"
    assert seen.body["stream"] is True
    assert seen.body["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_anthropic_stream(server: HTTPServer, framing: str) -> None:
    async with closing(anthropic(server)) as provider:
        assert await run(provider, f"claude-{framing}") == (
            "".join(TEXT), Finish("length", Usage(prompt_tokens=7, completion_tokens=4)))
    (seen,) = server.seen
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant"
    assert seen.headers["anthropic-version"]
    assert seen.body["system"] == "Be brief."


async def test_an_error_status_with_its_body(server: HTTPServer) -> None:
    async with closing(openai(server)) as provider:
        with pytest.raises(ProviderError) as info:
            await run(provider, "rate-limited")
        assert (info.value.kind, info.value.status, info.value.retry_after) == (
            "rate_limit", 429, 7.0)
        assert "slow down" in info.value.message
        await run(provider, "gpt-chunked")  # the error's body was read: connection reused
    assert server.connections.opened == 1


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_the_client_sees_the_framing_the_server_chose(
        server: HTTPServer, framing: str, certs: dict[str, Path]) -> None:
    """Not only the providers' outcome: the body arrives framed as sent, whole."""
    trusting = ssl.create_default_context(cafile=str(certs["ca"]))
    http = HTTPClient({"content-type": "application/json"}, read_timeout=10,
                      connect_timeout=5, ssl_context=trusting)
    payload = {"model": f"gpt-{framing}"}
    try:
        response = await http.post(f"{server.base_url}/chat/completions",
                                   orjson.dumps(payload))
        body = await response.read()
        assert response.at_eof()
        response.release()
    finally:
        await http.aclose()
    expected = answer("/v1/chat/completions", payload)
    assert body == b"".join(expected.chunks)
    if framing == "chunked":
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
    else:
        assert response.headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in response.headers


async def test_keep_alive_reuses_one_connection(server: HTTPServer) -> None:
    async with closing(openai(server)) as provider:
        for model in ("gpt-chunked", "gpt-length", "gpt-chunked"):
            assert (await run(provider, model))[0] == "".join(TEXT)
    assert len(server.seen) == 3
    assert server.connections.opened == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced(
        server: HTTPServer) -> None:
    async with closing(openai(server)) as provider:
        assert (await run(provider, "gpt-chunked"))[0] == "".join(TEXT)
        server.close_idle()
        async with asyncio.timeout(5):  # the server's close, not the pool's 30 s expiry
            await server.connections.wait_closed(1)
        assert (await run(provider, "gpt-length"))[0] == "".join(TEXT)
    assert server.connections.opened == 2


@pytest.mark.parametrize("proxy_scheme", ["http", "https"])
async def test_through_a_connect_proxy(https_server: HTTPServer, proxy_scheme: str,
                                       server_tls: ssl.SSLContext,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """CONNECT through the proxy, then TLS with the origin (inside the TLS with the
    proxy for an https:// one); the tunnel carries every request."""
    proxy_tls = server_tls if proxy_scheme == "https" else None
    async with ConnectProxy(proxy_tls, credentials=("user", "p@ss")) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("p@ss", "p%40ss"))
        async with closing(openai(https_server)) as provider:
            for model in ("gpt-chunked", "gpt-length"):
                assert (await run(provider, model))[0] == "".join(TEXT)
        async with closing(anthropic(https_server)) as provider:
            assert (await run(provider, "claude-chunked"))[0] == "".join(TEXT)
    assert [t.target for t in proxy.tunnels] == [f"127.0.0.1:{https_server.port}"] * 2
    assert all(t.opened for t in proxy.tunnels)
    assert https_server.connections.opened == 2  # one per provider (its own pool)
    assert all("proxy-authorization" not in seen.headers for seen in https_server.seen)
