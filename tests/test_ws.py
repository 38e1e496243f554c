"""The WebSocket protocol (SPEC §4) over a real socket with the ``websockets``
client, plus ``/v1/models`` and ``clawbus agent``: three doors, one run path."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.fakes.openai_upstream import RequestRecord
from tests.helpers import TOKEN, Stack

_ids = itertools.count(1)


def ws_url(stack: Stack) -> str:
    return stack.url.replace("http://", "ws://") + "/"


async def recv(ws: ClientConnection, seconds: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def request(ws: ClientConnection, method: str, params: Any = None) -> str:
    req_id = f"r{next(_ids)}"
    await ws.send(json.dumps({"type": "req", "id": req_id, "method": method,
                              "params": params if params is not None else {}}))
    return req_id


async def res_for(ws: ClientConnection, req_id: str,
                  events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The next ``res`` with this id (collecting events seen meanwhile)."""
    while True:
        frame = await recv(ws)
        if frame["type"] == "res" and frame["id"] == req_id:
            return frame
        if events is not None and frame["type"] == "event":
            events.append(frame)


async def call(ws: ClientConnection, method: str, params: Any = None) -> dict[str, Any]:
    return await res_for(ws, await request(ws, method, params))


async def connected(stack: Stack, token: str = TOKEN) -> ClientConnection:
    ws = await websockets.connect(ws_url(stack))
    challenge = await recv(ws)
    assert challenge["type"] == "event" and challenge["event"] == "connect.challenge"
    assert challenge["payload"]["nonce"] and challenge["payload"]["ts"] > 0
    res = await call(ws, "connect", {"minProtocol": 3, "maxProtocol": 3,
                                     "client": {"id": "test", "version": "1"},
                                     "auth": {"token": token}})
    assert res["ok"], res
    return ws


@pytest.fixture
async def ws(stack: Stack) -> AsyncIterator[ClientConnection]:
    conn = await connected(stack)
    try:
        yield conn
    finally:
        await conn.close()


def upstream_with(stack: Stack, text: str) -> list[RequestRecord]:
    return [r for r in stack.upstream.requests if text in orjson.dumps(r.body).decode()]


def png(size: int) -> bytes:
    """A PNG-signed blob (the gateway checks the declared MIME type, not the pixels)."""
    header = b"\x89PNG\r\n\x1a\n"
    return header + os.urandom(size - len(header))


def data_uri(blob: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(blob).decode()}"


def image_parts(record: RequestRecord) -> list[dict[str, Any]]:
    """The ``image_url`` objects of the upstream request's last message."""
    content = record.body["messages"][-1]["content"]
    return [p["image_url"] for p in content if p.get("type") == "image_url"]


async def test_handshake_hello_ok(stack: Stack) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await recv(ws)
        res = await call(ws, "connect", {"minProtocol": 1, "maxProtocol": 5,
                                         "auth": {"token": TOKEN}})
    payload = res["payload"]
    assert payload["type"] == "hello-ok" and payload["protocol"] == 3
    assert set(payload["features"]["methods"]) >= {
        "health", "agents.list", "agent", "chat.abort", "sessions.list", "chat.history",
        "sessions.reset"}
    assert "agent" in payload["features"]["events"]


@pytest.mark.parametrize("auth", [{"token": "wrong"}, {}, {"password": "nope"}, None])
async def test_bad_auth_closes_1008(stack: Stack, auth: Any) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await recv(ws)
        params: dict[str, Any] = {"minProtocol": 3, "maxProtocol": 3}
        if auth is not None:
            params["auth"] = auth
        res = await call(ws, "connect", params)
        assert res["ok"] is False and res["error"]["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    assert ws.close_code == 1008


@pytest.mark.parametrize("first", [
    json.dumps({"type": "req", "id": "1", "method": "health", "params": {}}),
    "not json at all",
    json.dumps([1, 2, 3]),
])
async def test_bad_first_frame_closes_1008(stack: Stack, first: str) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await recv(ws)
        await ws.send(first)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    assert ws.close_code == 1008


async def test_health_and_agents_list(ws: ClientConnection) -> None:
    health = await call(ws, "health")
    assert health["ok"] and health["payload"]["ok"] is True
    assert health["payload"]["workers"] == 3
    agents = await call(ws, "agents.list")
    assert agents["payload"]["defaultId"] == "main"
    assert [a["id"] for a in agents["payload"]["agents"]] == ["main", "beta"]


async def test_malformed_frames_get_error_res_not_a_crash(ws: ClientConnection) -> None:
    for bad in ("{nope", json.dumps({"type": "event"}), json.dumps({"type": "req", "id": 7}),
                json.dumps({"type": "req", "id": 8, "method": "no.such"})):
        await ws.send(bad)
        frame = await recv(ws)
        assert frame["type"] == "res" and frame["ok"] is False
        assert frame["error"]["code"] in ("INVALID_REQUEST", "UNKNOWN_METHOD")
    await ws.send(b"\x00binary")
    assert (await recv(ws))["ok"] is False
    bad_params = await call(ws, "agent", {"message": ""})
    assert bad_params["ok"] is False and bad_params["error"]["code"] == "invalid_request_error"
    assert (await call(ws, "health"))["ok"]  # still serving


async def test_agent_run_streams_events_then_final_res(stack: Stack,
                                                       ws: ClientConnection) -> None:
    tag = uuid.uuid4().hex[:8]
    stack.upstream.token_delay = 0.01
    req_id = await request(ws, "agent", {"message": f"one two three {tag}", "agentId": "beta",
                                         "sessionKey": f"ws:{tag}"})
    accepted = await res_for(ws, req_id)
    assert accepted["ok"] and accepted["payload"]["status"] == "accepted"
    run_id = accepted["payload"]["runId"]
    events: list[dict[str, Any]] = []
    final = await res_for(ws, req_id, events)
    assert final["ok"] and final["payload"]["status"] == "ok"
    assert final["payload"]["runId"] == run_id
    assert final["payload"]["result"]["text"] == f"echo: one two three {tag}"
    assert final["payload"]["result"]["usage"]["completion_tokens"] == 5
    agent_events = [e["payload"] for e in events if e["event"] == "agent"]
    assert all(p["runId"] == run_id for p in agent_events)
    assert [p["seq"] for p in agent_events] == list(range(1, len(agent_events) + 1))
    assert agent_events[0] == {"runId": run_id, "seq": 1, "stream": "lifecycle",
                               "data": {"phase": "start"}}
    assert agent_events[-1]["data"]["phase"] == "end"
    text = "".join(p["data"]["delta"] for p in agent_events if p["stream"] == "assistant")
    assert text == f"echo: one two three {tag}"
    frame_seqs = [e["seq"] for e in events]
    assert frame_seqs == sorted(frame_seqs)
    (rec,) = upstream_with(stack, tag)
    assert rec.body["messages"][0]["content"] == "You are beta."


async def test_two_concurrent_runs_on_one_socket(stack: Stack, ws: ClientConnection) -> None:
    stack.upstream.token_delay = 0.02
    a, b = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    ra = await request(ws, "agent", {"message": f"alpha {a} x y z", "sessionKey": f"ws:{a}"})
    rb = await request(ws, "agent", {"message": f"beta {b} x y z", "sessionKey": f"ws:{b}"})
    finals: dict[str, dict[str, Any]] = {}
    accepted: set[str] = set()
    async with asyncio.timeout(20):
        while len(finals) < 2:
            frame = await recv(ws)
            if frame["type"] != "res":
                continue
            if frame["payload"].get("status") == "accepted":
                accepted.add(frame["id"])
            else:
                finals[frame["id"]] = frame
    assert accepted == {ra, rb}
    assert finals[ra]["payload"]["result"]["text"] == f"echo: alpha {a} x y z"
    assert finals[rb]["payload"]["result"]["text"] == f"echo: beta {b} x y z"
    ta = upstream_with(stack, a)[0]
    tb = upstream_with(stack, b)[0]
    assert ta.ended and tb.ended
    assert ta.started < tb.ended and tb.started < ta.ended  # they overlapped in time


async def test_chat_abort(stack: Stack, ws: ClientConnection) -> None:
    tag = uuid.uuid4().hex[:8]
    stack.upstream.token_delay = 0.1
    req_id = await request(ws, "agent", {"message": f"{tag} " + "w " * 50})
    run_id = (await res_for(ws, req_id))["payload"]["runId"]
    await asyncio.to_thread(stack.upstream.wait_for, lambda recs: any(
        tag in orjson.dumps(r.body).decode() for r in recs), 10.0)
    abort = await call(ws, "chat.abort", {"runId": run_id})
    assert abort["payload"] == {"runId": run_id, "aborted": True}
    await asyncio.to_thread(stack.upstream.wait_for, lambda recs: any(
        tag in orjson.dumps(r.body).decode() and r.disconnected for r in recs), 1.0)
    unknown = await call(ws, "chat.abort", {"runId": "chatcmpl_nope"})
    assert unknown["payload"]["aborted"] is False


async def test_closing_the_socket_cancels_its_runs(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    stack.upstream.token_delay = 0.1
    conn = await connected(stack)
    req_id = await request(conn, "agent", {"message": f"{tag} " + "w " * 50,
                                           "sessionKey": f"ws:{tag}"})
    await res_for(conn, req_id)
    await asyncio.to_thread(stack.upstream.wait_for, lambda recs: any(
        tag in orjson.dumps(r.body).decode() for r in recs), 10.0)
    await conn.close()
    await asyncio.to_thread(stack.upstream.wait_for, lambda recs: any(
        tag in orjson.dumps(r.body).decode() and r.disconnected for r in recs), 1.0)


async def test_sessions_list_history_reset(stack: Stack, ws: ClientConnection) -> None:
    key = f"ws-sess:{uuid.uuid4().hex[:8]}"
    for text in ("first turn", "second turn"):
        req_id = await request(ws, "agent", {"message": text, "sessionKey": key})
        await res_for(ws, req_id)
        assert (await res_for(ws, req_id))["ok"]
    listed = (await call(ws, "sessions.list"))["payload"]["sessions"]
    mine = [s for s in listed if s["key"] == key]
    assert len(mine) == 1 and mine[0]["turns"] == 2 and mine[0]["agentId"] == "main"
    history = (await call(ws, "chat.history", {"sessionKey": key}))["payload"]["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "first turn"), ("assistant", "echo: first turn"),
        ("user", "second turn"), ("assistant", "echo: second turn")]
    last_two = (await call(ws, "chat.history", {"sessionKey": key, "limit": 2}))
    assert [m["content"] for m in last_two["payload"]["messages"]] == [
        "second turn", "echo: second turn"]
    assert (await call(ws, "sessions.reset", {"sessionKey": key}))["ok"]
    after = (await call(ws, "chat.history", {"sessionKey": key}))["payload"]["messages"]
    assert after == []
    bad = await call(ws, "chat.history", {"sessionKey": 5})
    assert bad["ok"] is False


async def test_agent_with_images_reaches_the_upstream_intact(stack: Stack,
                                                            ws: ClientConnection) -> None:
    tag = uuid.uuid4().hex[:8]
    key = f"ws-img:{tag}"
    first, second = png(3000), png(200_000)
    req_id = await request(ws, "agent", {
        "message": f"what are these {tag}", "sessionKey": key,
        "images": [data_uri(first), {"url": data_uri(second), "detail": "low"}]})
    assert (await res_for(ws, req_id))["payload"]["status"] == "accepted"
    final = await res_for(ws, req_id)
    assert final["ok"], final
    (record,) = upstream_with(stack, tag)
    parts = image_parts(record)
    assert [base64.b64decode(p["url"].split(",", 1)[1]) for p in parts] == [first, second]
    assert [p["url"].split(",", 1)[0] for p in parts] == ["data:image/png;base64"] * 2
    assert [p.get("detail") for p in parts] == [None, "low"]
    # The transcript keeps the text and a placeholder per image, never the bytes.
    history = (await call(ws, "chat.history", {"sessionKey": key}))["payload"]["messages"]
    assert history[0]["content"] == (f"what are these {tag}\n[image: image/png, 3 KB]\n"
                                     "[image: image/png, 195 KB]")


async def test_agent_with_only_an_image(stack: Stack, ws: ClientConnection) -> None:
    """With images, the message may be empty (or left out)."""
    key = f"ws-img:{uuid.uuid4().hex[:8]}"
    uri = data_uri(png(1500))
    req_id = await request(ws, "agent", {"sessionKey": key, "images": [uri]})
    assert (await res_for(ws, req_id))["payload"]["status"] == "accepted"
    assert (await res_for(ws, req_id))["ok"]
    (record,) = [r for r in stack.upstream.requests if uri in orjson.dumps(r.body).decode()]
    assert [p["url"] for p in image_parts(record)] == [uri]
    history = (await call(ws, "chat.history", {"sessionKey": key}))["payload"]["messages"]
    assert history[0]["content"] == "[image: image/png, 1 KB]"


PNG_URI = data_uri(png(64))
NOT_AN_ARRAY = "`images` must be an array of image URLs or {url, detail?} objects."
NOT_AN_IMAGE = "must be a data URI or an http(s) URL, or an object {url, detail?}."


@pytest.mark.parametrize(("params", "message"), [
    ({"images": PNG_URI}, NOT_AN_ARRAY),
    ({"images": {"url": PNG_URI}}, NOT_AN_ARRAY),
    ({"images": [PNG_URI] * 9}, "`images` holds 9 images; at most 8 a turn."),
    ({"images": [PNG_URI, 5]}, f"`images[1]` {NOT_AN_IMAGE}"),
    ({"images": [None]}, f"`images[0]` {NOT_AN_IMAGE}"),
    ({"images": [{"detail": "low"}]}, f"`images[0]` {NOT_AN_IMAGE}"),
    ({"images": [{"url": PNG_URI, "detail": 1}]}, "`images[0].detail` must be a string."),
    ({"images": [PNG_URI, "data:image/png;base64,@@@"]},
     "`images[1]`: bad data URI (invalid base64)."),
    ({"images": ["data:image/png,rawbytes"]}, "`images[0]`: bad data URI (not base64-encoded)."),
    ({"images": [data_uri(b"<svg/>", "image/svg+xml")]},
     "`images[0]`: image type 'image/svg+xml' is not allowed"),
    ({"images": ["http://127.0.0.1/cat.png"]}, "`images[0]`: image URL fetching is disabled."),
    ({"images": ["ftp://example.com/cat.png"]},
     "`images[0]`: unsupported image URL scheme 'ftp'."),
    ({"message": " ", "images": []}, "`message` must be a non-empty string."),
    ({"message": 5, "images": [PNG_URI]}, "`message` must be a string."),
])
async def test_agent_image_errors(stack: Stack, ws: ClientConnection, params: dict[str, Any],
                                  message: str) -> None:
    """Each is an error ``res`` (the OpenAI error fields, 400) and reaches no model."""
    tag = uuid.uuid4().hex[:8]
    res = await call(ws, "agent", {"message": f"bad image {tag}", **params})
    assert res["ok"] is False
    assert res["error"]["code"] == "invalid_request_error" and res["error"]["status"] == 400
    assert res["error"]["message"].startswith(message)
    assert (await call(ws, "health"))["ok"]  # the socket still serves
    assert not upstream_with(stack, tag)


def test_models_endpoint_with_the_sdk(stack: Stack) -> None:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key=TOKEN, max_retries=0) as c:
        ids = [m.id for m in c.models.list()]
        one = c.models.retrieve("openclaw/beta")
        with pytest.raises(openai.NotFoundError) as err:
            c.models.retrieve("gpt-4o")
    assert ids == ["openclaw", "openclaw/default", "openclaw/main", "openclaw/beta"]
    assert one.id == "openclaw/beta" and one.owned_by == "openclaw"
    assert err.value.body["message"] == "Model 'gpt-4o' not found."  # type: ignore[index]
    wrong = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401


def agent_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clawbus", "agent", "--config", str(stack.config),
         "--bus-url", stack.nats.url, *args],
        capture_output=True, text=True, timeout=60, check=False)


def test_agent_cli_streams_and_json(stack: Stack) -> None:
    plain = agent_cli(stack, "--message", "hello from the cli")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "echo: hello from the cli\n"
    as_json = agent_cli(stack, "--message", "json please", "--agent", "beta", "--json")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["text"] == "echo: json please" and result["agentId"] == "beta"
    assert result["sessionKey"] == "agent:beta:main" and result["usage"]["total_tokens"] > 0


def test_agent_cli_failures_are_clear(stack: Stack) -> None:
    unknown = agent_cli(stack, "--message", "hi", "--agent", "ghost")
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        "clawbus agent: Unknown agent 'ghost'.")
    stack.upstream.fail_status = 500
    try:
        failed = agent_cli(stack, "--message", "hi")
    finally:
        stack.upstream.fail_status = None
    assert failed.returncode == 1
    assert "upstream provider failed" in failed.stderr and "Traceback" not in failed.stderr


async def test_three_doors_one_session_one_prompt(stack: Stack) -> None:
    """The same turn over HTTP, WS and the CLI: the upstream sees the same prompt
    for each, and turns sent through the three doors land in one session."""
    fresh = [f"doors:{uuid.uuid4().hex[:8]}" for _ in range(3)]
    shared = f"doors:{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]

    async def via_http(key: str, text: str) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(f"{stack.url}/v1/chat/completions", json={
                "model": "openclaw", "messages": [{"role": "user", "content": text}]},
                headers={"Authorization": f"Bearer {TOKEN}", "x-openclaw-session-key": key})
            assert resp.status_code == 200

    async def via_ws(key: str, text: str) -> None:
        conn = await connected(stack)
        try:
            req_id = await request(conn, "agent", {"message": text, "sessionKey": key})
            await res_for(conn, req_id)
            assert (await res_for(conn, req_id))["ok"]
        finally:
            await conn.close()

    async def via_cli(key: str, text: str) -> None:
        done = await asyncio.to_thread(agent_cli, stack, "--message", text,
                                       "--session-key", key)
        assert done.returncode == 0, done.stderr

    doors = (via_http, via_ws, via_cli)
    for door, key in zip(doors, fresh, strict=True):
        await door(key, f"same prompt {tag}")
    bodies = [r.body["messages"] for r in upstream_with(stack, f"same prompt {tag}")]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]

    for i, door in enumerate(doors):
        await door(shared, f"turn{i} {tag}")
    (last,) = upstream_with(stack, f"turn2 {tag}")
    assert [m["content"] for m in last.body["messages"][1:]] == [
        f"turn0 {tag}", f"echo: turn0 {tag}", f"turn1 {tag}", f"echo: turn1 {tag}",
        f"turn2 {tag}"]
