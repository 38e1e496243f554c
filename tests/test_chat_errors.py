"""Every SPEC §2 error row, in its order, with status, message and envelope.

Most rows are checked in-process (``httpx.ASGITransport``: the socket does not
matter, and it lets a test pose as a non-loopback client for the lockout) against
a real NATS; the run-failure rows go through a real worker and fake upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from fastapi import FastAPI

from clawbus.config import parse_settings
from clawbus.natsserver import NatsServer
from gateway.app import create_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import validate

AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "/v1/chat/completions"
USER_MSG = {"messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def in_process(config: dict[str, Any], bus_url: str,
                     client_ip: str = "203.0.113.7") -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(parse_settings(config, env={}), bus_url)
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://gw") as http:
        yield http


def assert_error(resp: httpx.Response, status: int, message: str, type_: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    validate("error_response", body)
    assert body["error"]["message"] == message
    assert body["error"]["type"] == type_
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"


@pytest.fixture
def cfg() -> dict[str, Any]:
    config = base_config(None, queueTimeoutSeconds=0.5)
    config["gateway"]["auth"]["rateLimit"] = {"maxAttempts": 3, "windowSeconds": 60,
                                              "lockoutSeconds": 120}
    config["gateway"]["http"]["endpoints"]["chatCompletions"]["maxBodyBytes"] = 2048
    return config


async def test_disabled_endpoint_is_plain_404(shared_nats: NatsServer,
                                              cfg: dict[str, Any]) -> None:
    cfg["gateway"]["http"]["endpoints"]["chatCompletions"]["enabled"] = False
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=USER_MSG, headers=AUTH)
    assert resp.status_code == 404
    assert resp.text == "Not Found"
    assert resp.headers["content-type"].startswith("text/plain")


async def test_a_bug_in_the_handler_is_a_500_envelope(shared_nats: NatsServer,
                                                      cfg: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat endpoint skips the framework's middleware (gateway.app.GatewayApp):
    an unexpected exception still gives the documented 500 shape, never a traceback."""
    import gateway.chat

    def broken(*_: object, **__: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.chat, "parse_chat_request", broken)
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=USER_MSG, headers=AUTH)
    assert_error(resp, 500, "internal error", "api_error")
    assert "Traceback" not in resp.text and "a bug" not in resp.text


async def test_method_not_allowed(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.get(URL, headers=AUTH)
    assert_error(resp, 405, "Method Not Allowed", "invalid_request_error")
    assert resp.headers["allow"] == "POST"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "Bearer", "bearer  "])
async def test_unauthorized(shared_nats: NatsServer, cfg: dict[str, Any],
                            header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with in_process(cfg, shared_nats.url) as http:
        # Auth comes before the body: even garbage gets 401.
        resp = await http.post(URL, content=b"{not json", headers=headers)
    assert_error(resp, 401, "Unauthorized", "unauthorized")


async def test_bearer_scheme_is_case_insensitive(shared_nats: NatsServer,
                                                 cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=b"[]", headers={"Authorization": f"bEaReR {TOKEN}"})
    assert resp.status_code == 400  # past auth


async def test_lockout_then_retry_after(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        for _ in range(3):
            resp = await http.post(URL, json=USER_MSG, headers={"Authorization": "Bearer no"})
            assert resp.status_code == 401
        resp = await http.post(URL, json=USER_MSG, headers=AUTH)  # even the right secret
    assert_error(resp, 429, "Too many failed authentication attempts. Please try again later.",
                 "rate_limited")
    assert 100 <= int(resp.headers["retry-after"]) <= 120


async def test_loopback_is_never_locked_out(shared_nats: NatsServer,
                                            cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url, client_ip="127.0.0.1") as http:
        for _ in range(6):
            resp = await http.post(URL, json=USER_MSG, headers={"Authorization": "Bearer no"})
            assert resp.status_code == 401
        resp = await http.post(URL, content=b"[]", headers=AUTH)
    assert resp.status_code == 400


async def test_payload_too_large(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    big = orjson.dumps({"messages": [{"role": "user", "content": "x" * 4096}]})
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=big, headers=AUTH)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            for _ in range(5):
                yield b" " * 1024

        chunked = await http.post(URL, content=chunks(), headers=AUTH)
    assert_error(resp, 413, "Payload too large", "invalid_request_error")
    assert_error(chunked, 413, "Payload too large", "invalid_request_error")


@pytest.mark.parametrize(("body", "message_start"), [
    (b"{not json", "Invalid JSON body"),
    (b"[1, 2]", "Request body must be a JSON object."),
    (b'"text"', "Request body must be a JSON object."),
    (b"\xff\xfe\x00", "Invalid JSON body"),
])
async def test_bad_json(shared_nats: NatsServer, cfg: dict[str, Any], body: bytes,
                        message_start: str) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=body, headers=AUTH)
    assert resp.status_code == 400
    validate("error_response", resp.json())
    assert resp.json()["error"]["message"].startswith(message_start)
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "headers", "message"), [
    ({"model": "gpt-4o", **USER_MSG}, {},
     "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."),
    ({"model": "openclaw/nope", **USER_MSG}, {}, "Unknown agent 'nope'."),
    ({"model": "openclaw", **USER_MSG}, {"x-openclaw-agent-id": "ghost"},
     "Unknown agent 'ghost'."),
    ({"model": "openclaw", **USER_MSG}, {"x-openclaw-session-key": "cron:nightly"},
     "`x-openclaw-session-key` cannot use reserved internal session namespaces."),
    ({"model": "openclaw", "temperature": 3, **USER_MSG}, {},
     "`temperature` must be between 0 and 2."),
    ({"model": "openclaw", "stream": "yes", **USER_MSG}, {}, "`stream` must be a boolean."),
    ({"model": "openclaw", "messages": [{"role": "assistant", "content": "hi"}]}, {},
     "Missing user message in `messages`."),
    ({}, {}, "Missing user message in `messages`."),
    # Order: a bad model is reported before missing messages.
    ({"model": 5}, {}, "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."),
])
async def test_request_validation_rows(shared_nats: NatsServer, cfg: dict[str, Any],
                                       body: dict[str, Any], headers: dict[str, str],
                                       message: str) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=body, headers={**AUTH, **headers})
    assert_error(resp, 400, message, "invalid_request_error")


async def test_empty_body_counts_as_empty_object(shared_nats: NatsServer,
                                                 cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=b"", headers=AUTH)
    assert_error(resp, 400, "Missing user message in `messages`.", "invalid_request_error")


async def test_no_worker_is_503_and_run_never_executes_later(
        tmp_path: Path, cfg: dict[str, Any]) -> None:
    """Its own NATS (no worker anywhere): 503 within the queue timeout, and the
    queued run is gone from the bus so no worker can run it behind the client's back."""
    with NatsServer(store_dir=tmp_path / "nats") as nats:
        async with in_process(cfg, nats.url) as http:
            resp = await http.post(URL, json={"model": "openclaw", **USER_MSG}, headers=AUTH)
            stream = await http.post(URL, json={"model": "openclaw", "stream": True,
                                                **USER_MSG}, headers=AUTH)
        assert_error(resp, 503, "No agent worker available.", "api_error")
        assert stream.status_code == 200
        frames = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert orjson.loads(frames[-2])["error"]["message"] == "No agent worker available."
        assert frames[-1] == "[DONE]"
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        try:
            info = await nc.jetstream().stream_info("RUNS")
        finally:
            await nc.close()
        assert info.state.messages == 0


async def test_run_dropped_from_the_queue_unserved_is_503_not_a_hang(
        tmp_path: Path, cfg: dict[str, Any]) -> None:
    """A worker is alive (its registry heartbeats go on) but the run's message left
    the queue with no event ever sent (as when a worker gives a run up finding its
    gateway unreachable): the client gets a 503 at the queue timeout, not an endless
    wait. While the message is still queued, the gateway waits on (a long earlier run
    of the session, a worker being recovered)."""
    import nats as nats_py

    from bus import subjects

    with NatsServer(store_dir=tmp_path / "nats") as server:
        async with in_process(cfg, server.url) as http:
            nc = await nats_py.connect(server.url)
            js = nc.jetstream()
            kv = await js.key_value(subjects.WORKERS_BUCKET)
            beating = True

            async def heartbeats() -> None:  # a live worker that never takes anything
                while beating:
                    await kv.put(subjects.session_token("w-idle"), b'{"id": "w-idle"}')
                    await asyncio.sleep(0.1)

            beat = asyncio.create_task(heartbeats())
            try:
                await kv.put(subjects.session_token("w-idle"), b'{"id": "w-idle"}')
                post = asyncio.create_task(http.post(
                    URL, json={"model": "openclaw", "user": "u-lost", **USER_MSG},
                    headers=AUTH))
                # Well past the queue timeout (0.5 s) the run is still waiting.
                seq = 0
                deadline = time.monotonic() + 10
                while not seq and time.monotonic() < deadline:
                    seq = (await js.stream_info("RUNS")).state.last_seq
                    await asyncio.sleep(0.02)
                done, _ = await asyncio.wait({post}, timeout=1.5)
                assert not done, "answered while its run was still queued"
                await js.delete_msg("RUNS", seq)  # the run leaves the queue unserved
                resp = await asyncio.wait_for(post, timeout=5)
            finally:
                beating = False
                await beat
                await nc.close()
    assert_error(resp, 503, "the run left the queue without being served", "api_error")


async def test_run_held_queued_past_any_earlier_run_is_503_not_a_hang(
        tmp_path: Path, cfg: dict[str, Any]) -> None:
    """A worker keeps saying the run is queued behind its session's earlier run
    (as a stuck lease would make it): once longer than any earlier run could take
    (queue timeout + the longest agent timeout + an ack wait) the client gets a
    503, not an endless wait."""
    import nats as nats_py

    from bus import subjects
    from bus.messages import Queued, RunRequest

    cfg["agents"]["defaults"]["timeoutSeconds"] = 0.5
    cfg["bus"]["ackWaitSeconds"] = 3  # (the least it may be) → a 4 s bound
    with NatsServer(store_dir=tmp_path / "nats") as server:
        async with in_process(cfg, server.url) as http:
            nc = await nats_py.connect(server.url)
            kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
            runs: list[RunRequest] = []

            async def on_run(msg: Any) -> None:
                runs.append(RunRequest.model_validate_json(msg.data))

            await nc.subscribe("runs.>", cb=on_run)
            going = True

            async def stuck_worker() -> None:  # alive, holding the run, forever queued
                while going:
                    await kv.put(subjects.session_token("w-stuck"), b'{"id": "w-stuck"}')
                    for run in runs:
                        queued = Queued(seq=0, attempt=1, worker_id="w-stuck", ack="")
                        with contextlib.suppress(Exception):
                            await nc.request(run.events_subject,
                                             queued.model_dump_json().encode(), timeout=1)
                    await asyncio.sleep(0.2)

            worker = asyncio.create_task(stuck_worker())
            try:
                await kv.put(subjects.session_token("w-stuck"), b'{"id": "w-stuck"}')
                started = time.monotonic()
                resp = await asyncio.wait_for(http.post(
                    URL, json={"model": "openclaw", "user": "u-stuck", **USER_MSG},
                    headers=AUTH), timeout=30)
                waited = time.monotonic() - started
            finally:
                going = False
                await worker
                await nc.close()
    assert_error(resp, 503, "the run's turn in its session never came (an earlier run of "
                 "the session did not end)", "api_error")
    assert 4.0 <= waited < 10, waited


# -- run failures: through a real worker and the fake upstream -------------------


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with FakeOpenAI() as up:
        config = base_config(up)
        config["models"]["providers"]["fake"]["timeoutSeconds"] = 0.5
        st = Stack.start(tmp_path_factory.mktemp("failing"), up, config)
        try:
            yield st
        finally:
            st.stop()


@pytest.mark.parametrize(("setup", "status", "type_", "message"), [
    ({"fail_status": 401}, 500, "authentication_error", None),
    ({"fail_status": 429}, 429, "rate_limit_error", "upstream provider rate limit exceeded"),
    ({"fail_status": 500}, 500, "api_error", None),
    ({"stall": True}, 504, "api_error", "upstream provider timeout"),
])
def test_run_failure_rows(failing: Stack, setup: dict[str, Any], status: int, type_: str,
                          message: str | None) -> None:
    up = failing.upstream
    up.fail_status, up.stall = None, False
    for key, value in setup.items():
        setattr(up, key, value)
    try:
        with httpx.Client(timeout=30) as http:
            resp = http.post(f"{failing.url}{URL}", json={"model": "openclaw", **USER_MSG},
                             headers=AUTH)
    finally:
        up.fail_status, up.stall = None, False
    assert resp.status_code == status, resp.text
    validate("error_response", resp.json())
    assert resp.json()["error"]["type"] == type_
    if message is not None:
        assert resp.json()["error"]["message"] == message
    if status == 429:
        assert resp.headers["retry-after"] == "1"


def test_upstream_unreachable_is_502(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = base_config(None)
    config["models"]["providers"]["dead"] = {"api": "openai-completions",
                                             "baseUrl": f"http://127.0.0.1:{port}/v1"}
    config["agents"]["defaults"]["model"] = "dead/x"
    st = Stack.start(tmp_path, FakeOpenAI(), config)
    try:
        with openai.OpenAI(base_url=f"{st.url}/v1", api_key=TOKEN, max_retries=0) as c, \
                pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="openclaw", messages=[{"role": "user",
                                                                   "content": "hi"}])
    finally:
        st.stop()
    assert err.value.status_code == 502
    assert err.value.body == {"message": "upstream provider error", "type": "api_error",
                              "param": None, "code": "unreachable"}


def test_auth_happens_before_any_upstream_call(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="openclaw",
                                  messages=[{"role": "user", "content": "hi"}])
    assert len(stack.upstream.requests) == before


def test_stream_error_after_200(failing: Stack) -> None:
    failing.upstream.garbage_after = 2
    try:
        with httpx.Client(timeout=30) as http:
            resp = http.post(f"{failing.url}{URL}", headers=AUTH, json={
                "model": "openclaw", "stream": True,
                "messages": [{"role": "user", "content": "one two three four"}]})
    finally:
        failing.upstream.garbage_after = None
    frames = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = orjson.loads(frames[-2])
    assert set(error["error"]) >= {"message", "type"}
    assert error["error"]["message"].startswith("upstream provider error")



def test_failed_run_leaves_no_turn(failing: Stack) -> None:
    key = f"failed:{uuid.uuid4().hex}"
    headers = {**AUTH, "x-openclaw-session-key": key}
    failing.upstream.fail_status = 500
    try:
        with httpx.Client(timeout=30) as http:
            bad = http.post(f"{failing.url}{URL}", headers=headers, json={
                "model": "openclaw", "messages": [{"role": "user", "content": "lost turn"}]})
    finally:
        failing.upstream.fail_status = None
    assert bad.status_code == 500
    with httpx.Client(timeout=30) as http:
        good = http.post(f"{failing.url}{URL}", headers=headers, json={
            "model": "openclaw", "messages": [{"role": "user", "content": "kept turn"}]})
    assert good.status_code == 200
    last = failing.upstream.requests[-1]
    assert [m["content"] for m in last.body["messages"][1:]] == ["kept turn"]


def test_stalled_worker_hits_idle_timeout(tmp_path: Path) -> None:
    """A worker frozen mid-run (SIGSTOP) stops heartbeating: the client gets an
    error after ~3 heartbeats instead of hanging."""
    with FakeOpenAI(token_delay=0.3) as up:
        st = Stack.start(tmp_path, up, base_config(up))
        try:
            with httpx.Client(timeout=30) as http, http.stream(
                    "POST", f"{st.url}{URL}", headers=AUTH, json={
                        "model": "openclaw", "stream": True,
                        "messages": [{"role": "user", "content": "a b c d e f g h i j"}]}
                    ) as resp:
                lines = resp.iter_lines()
                for line in lines:
                    if "echo" in line:
                        st.workers[0].signal(signal.SIGSTOP)
                        break
                rest = list(lines)
            st.workers[0].signal(signal.SIGCONT)
        finally:
            st.stop()
    frames = [line[6:] for line in rest if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert orjson.loads(frames[-2])["error"]["message"] == "agent worker stopped responding"
