"""Agents that act (SPEC §9), end to end: a stack of two gateways and two workers
whose agents have real MCP servers (the official SDK's server: one over stdio, one
over streamable HTTP on a loopback port), and a fake OpenAI-dialect model that
asks for tool calls and answers from their results.

- two rounds with a parallel pair of calls, streamed; the transcript holds every
  step and the next turn of the session sees the tool results;
- faults: a hanging tool (timeout result), a raising tool (error result), a stdio
  server that crashes mid-call (error result, restarted for the next run, no
  zombie), maxRounds exceeded (clean error), a client that disconnects mid-tool
  (the call cancelled within a second, nothing stored);
- the stdio child's environment holds none of the worker's secrets;
- WebSocket clients see tool steps only with the ``tool-events`` cap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import orjson
import pytest
import websockets

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http_upstream import FakeReply, text_of
from tests.fakes.mcp_servers import HttpMcpServer, stdio_command
from tests.fakes.openai_upstream import FakeOpenAI
from tests.faultkit import EventTap
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import validate

SECRET = "sk-worker-secret-do-not-leak"


def tool_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool messages after the last user message."""
    out: list[dict[str, Any]] = []
    for message in reversed(body["messages"]):
        if message["role"] == "user":
            break
        if message["role"] == "tool":
            out.insert(0, message)
    return out


def last_user(body: dict[str, Any]) -> str:
    return next(text_of(m["content"]) for m in reversed(body["messages"]) if m["role"] == "user")


def agent_model(body: dict[str, Any]) -> str | FakeReply:
    """A model scripted by the question's keyword; it answers from tool results."""
    question = last_user(body)
    results = [text_of(m["content"]) for m in tool_results(body)]
    if "two rounds" in question:
        if not results:  # a parallel pair, one on each server
            return FakeReply("Adding.", [("calc__add", '{"a": 1, "b": 2}'),
                                         ("web__add", '{"a": 3, "b": 4}')])
        if len(results) == 2:
            a, b = (int(r) for r in results)
            return FakeReply("", [("calc__add", json.dumps({"a": a, "b": b}))])
        return f"The total is {results[-1]}."
    for keyword, call in (("hang", ("calc__slow", '{"seconds": 30}')),
                          ("raise", ("calc__boom", "{}")),
                          ("crash", ("calc__crash", "{}")),
                          ("loop", ("calc__add", '{"a": 1, "b": 1}')),
                          ("env", ("calc__echo_env", '{"name": "OPENAI_API_KEY"}')),
                          ("path", ("calc__echo_env", '{"name": "PATH"}')),
                          ("pid", ("calc__pid", "{}"))):
        if keyword in question and (not results or keyword == "loop"):
            return FakeReply("", [call])
    if results:
        return "Tool said: " + " | ".join(results)
    if "earlier" in question:
        seen = [text_of(m.get("content")) for m in body["messages"] if m["role"] == "tool"]
        return "I saw: " + ", ".join(seen)
    return "plain: " + question


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with FakeOpenAI(reply=agent_model) as up, HttpMcpServer() as http_server:
        config = base_config(up)
        servers = {"calc": {"command": stdio_command(), "env": {"CALC_MODE": "test"},
                            "cwd": str(Path(__file__).resolve().parent.parent)},
                   "web": {"url": http_server.url}}
        config["agents"]["list"] = [
            {"id": "main", "default": True,
             "tools": {"mcpServers": servers, "callTimeoutSeconds": 2, "maxRounds": 3}},
            {"id": "beta", "tools": {"mcpServers": servers, "maxRounds": 2,
                                     "deny": ["web__*"]}},
        ]
        # The workers' environment holds a secret the MCP servers must not see.
        saved = os.environ.get("OPENAI_API_KEY")
        os.environ["OPENAI_API_KEY"] = SECRET
        try:
            st = Stack.start(tmp_path_factory.mktemp("agent-tools"), up, config,
                             gateways=2, workers=2)
        finally:
            if saved is None:
                del os.environ["OPENAI_API_KEY"]
            else:
                os.environ["OPENAI_API_KEY"] = saved
        try:
            yield st
        finally:
            st.stop()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def ask(url: str, text: str, **extra: Any) -> Any:
    with sdk(url) as client:
        return client.chat.completions.create(
            model=extra.pop("model", "openclaw"),
            messages=[{"role": "user", "content": text}], **extra)


def tag() -> str:
    return uuid.uuid4().hex[:10]


def test_two_rounds_with_a_parallel_pair_streamed_then_remembered(mstack: Stack) -> None:
    t = tag()
    with sdk(mstack.url) as client:
        chunks = list(client.chat.completions.create(
            model="openclaw", user=f"u-{t}", stream=True,
            messages=[{"role": "user", "content": f"[{t}] two rounds"}]))
    for chunk in chunks:
        validate("chat_completion_chunk", chunk.model_dump(mode="json", exclude_unset=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Adding.\n\nThe total is 10."
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The model's calls: the pair's results (3 and 7) came back, then 3+7.
    bodies = [r.body for r in mstack.upstream.requests
              if isinstance(r.body, dict) and f"[{t}] two rounds" in orjson.dumps(r.body).decode()]
    assert len(bodies) == 3
    assert [text_of(m["content"]) for m in tool_results(bodies[1])] == ["3", "7"]
    assert {t["function"]["name"] for t in bodies[0]["tools"]} >= {"calc__add", "web__add"}
    # The next turn, through the other gateway, sees every step of the loop.
    reply = ask(mstack.gateways[1].url, f"[{t}] what did you see earlier?", user=f"u-{t}")
    assert reply.choices[0].message.content == "I saw: 3, 7, 10"
    *_, later = [r.body for r in mstack.upstream.requests
                 if isinstance(r.body, dict) and "earlier?" in orjson.dumps(r.body).decode()
                 and t in orjson.dumps(r.body).decode()]
    roles = [m["role"] for m in later["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant",
                     "user"]


def test_hanging_tool_times_out_and_the_run_completes(mstack: Stack) -> None:
    started = time.monotonic()
    reply = ask(mstack.url, f"[{tag()}] hang please")
    assert time.monotonic() - started < 15
    content = reply.choices[0].message.content
    assert content.startswith("Tool said: Error: ") and "timed out" in content


def test_raising_tool_is_an_error_result(mstack: Stack) -> None:
    content = ask(mstack.url, f"[{tag()}] raise please").choices[0].message.content
    assert content.startswith("Tool said: Error: ")


def test_crashed_stdio_server_is_restarted_without_zombies(mstack: Stack) -> None:
    content = ask(mstack.url, f"[{tag()}] crash please").choices[0].message.content
    assert content.startswith("Tool said: Error: ")
    # Both workers' next runs work (each restarts its own server as needed).
    for _ in range(4):
        assert ask(mstack.url, f"[{tag()}] pid please").choices[0].message.content \
            .startswith("Tool said: ")
    for worker in mstack.workers:
        assert zombies_of(worker.pid) == []


def zombies_of(pid: int) -> list[int]:
    """Child processes of ``pid`` that exited and were never reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def test_max_rounds_exceeded_is_a_clean_error(mstack: Stack) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        ask(mstack.url, f"[{tag()}] loop forever", model="openclaw/beta")
    assert info.value.message.endswith("agent tool loop exceeded maxRounds")
    validate("error_response", {"error": info.value.body})


def test_stdio_server_gets_no_worker_secrets(mstack: Stack) -> None:
    content = ask(mstack.url, f"[{tag()}] env please").choices[0].message.content
    assert SECRET not in content and content == "Tool said: "
    path = ask(mstack.url, f"[{tag()}] path please").choices[0].message.content
    assert "/" in path  # PATH is passed


def test_deny_hides_tools(mstack: Stack) -> None:
    t = tag()
    ask(mstack.url, f"[{t}] hello", model="openclaw/beta")
    (body,) = [r.body for r in mstack.upstream.requests
               if isinstance(r.body, dict) and t in orjson.dumps(r.body).decode()]
    names = {tool["function"]["name"] for tool in body["tools"]}
    assert "calc__add" in names and not any(n.startswith("web__") for n in names)


def test_client_disconnect_mid_tool_cancels_the_call(mstack: Stack, tmp_path: Path) -> None:
    t = tag()
    marker = tmp_path / "cancelled"
    mstack.upstream.reply = lambda body: (
        FakeReply("", [("calc__slow", json.dumps({"seconds": 30, "marker": str(marker)}))])
        if not tool_results(body) else agent_model(body))
    try:
        with httpx.Client(timeout=30) as client, client.stream(
                "POST", f"{mstack.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"model": "openclaw", "stream": True, "user": f"d-{t}",
                      "messages": [{"role": "user", "content": f"[{t}] wait"}]}) as response:
            lines = response.iter_lines()  # (kept open: closing it would disconnect)
            next(lines)  # the role chunk: the run is under way
            # The tool writes "started" once its call reached the server.
            wait_for(lambda: marker.exists() and marker.read_text() == "started", 20)
        left = time.monotonic()
        wait_for(lambda: marker.read_text() == "cancelled", 5)
        assert time.monotonic() - left < 1.0
    finally:
        mstack.upstream.reply = agent_model
    # Nothing was stored for the abandoned run.
    history = ask(mstack.url, f"[{t}] earlier?", user=f"d-{t}")
    assert history.choices[0].message.content == "I saw: "


def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


async def ws_run(url: str, text: str, caps: list[str]) -> list[dict[str, Any]]:
    """An ``agent`` run over the WebSocket; the agent events it got."""
    async with websockets.connect(url.replace("http", "ws") + "/") as ws:
        await ws.recv()  # connect.challenge
        await ws.send(orjson.dumps({"type": "req", "id": 1, "method": "connect", "params": {
            "minProtocol": 3, "maxProtocol": 3, "client": {"id": "test"},
            "caps": caps, "auth": {"token": TOKEN}}}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"type": "req", "id": 2, "method": "agent",
                                    "params": {"message": text}}).decode())
        events: list[dict[str, Any]] = []
        finals = 0
        while finals < 2:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "event" and frame["event"] == "agent":
                events.append(frame["payload"])
            elif frame["type"] == "res" and frame["id"] == 2:
                finals += 1
        return events


def test_ws_tool_events_only_with_the_cap(mstack: Stack) -> None:
    """Clients that show tool steps (WS caps) get them; for the others the worker
    sends none at all (the bus carries no tool events for their runs)."""
    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
        tap = await EventTap().start(mstack.nats.url)
        try:
            with_cap = await ws_run(mstack.url, f"[{tag()}] two rounds", ["tool-events"])
            sent_with = sum(r.type == "tool" for r in tap.snapshot())
            without = await ws_run(mstack.url, f"[{tag()}] two rounds", [])
            sent_without = sum(r.type == "tool" for r in tap.snapshot()) - sent_with
        finally:
            await tap.close()
        return with_cap, without, sent_with, sent_without

    with_cap, without, sent_with, sent_without = asyncio.run(both())
    assert sent_with == 6 and sent_without == 0  # (3 calls: a start and a result each)
    steps = [e["data"] for e in with_cap if e["stream"] == "tool"]
    assert [(s["phase"], s["name"]) for s in steps[:2]] == [("start", "calc__add"),
                                                            ("start", "web__add")]
    results = [s for s in steps if s["phase"] == "result"]
    assert sorted(s["result"] for s in results) == ["10", "3", "7"]
    assert all(s["isError"] is False and s["toolCallId"] for s in results)
    assert steps[0]["args"] == '{"a": 1, "b": 2}'
    assert not [e for e in without if e["stream"] == "tool"]


# ------------------------------------------------------- a worker killed mid-loop


def test_worker_killed_mid_tool_call_the_run_is_retried(mstack: Stack, tmp_path: Path) -> None:
    """The only worker is SIGKILLed while a tool call runs, before any text: the
    run goes to a fresh worker, which calls the model and the tools again. The
    repeated MCP calls carry the same run id in ``_meta`` (a server can
    deduplicate by it); the tool call id is the model's, new on the retry."""
    t = tag()
    marker = tmp_path / "slow"

    def model(body: dict[str, Any]) -> str | FakeReply:
        results = [text_of(m["content"]) for m in tool_results(body)]
        if not results:
            return FakeReply("", [("calc__meta", "{}"),
                                  ("calc__slow", json.dumps({"seconds": 1.5,
                                                             "marker": str(marker)}))])
        return "meta " + results[0]

    for worker in mstack.workers[1:]:
        worker.stop()
    del mstack.workers[1:]
    mstack.upstream.reply = model
    try:
        with sdk(mstack.url) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: client.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": f"[{t}] survive"}]))
            wait_for(lambda: marker.exists() and marker.read_text() == "started", 20)
            victim = mstack.workers.pop()
            victim.kill()
            mstack.add_worker()
            reply = future.result(timeout=60)
    finally:
        mstack.upstream.reply = agent_model
        while len(mstack.workers) < 2:
            mstack.add_worker()
    text = reply.choices[0].message.content or ""
    assert text.startswith("meta ")
    meta = json.loads(text.removeprefix("meta "))
    assert meta["clawbus/runId"] == reply.id
    calls = [r.body for r in mstack.upstream.requests
             if isinstance(r.body, dict) and f"[{t}] survive" in orjson.dumps(r.body).decode()]
    assert len(calls) == 3  # round 1, killed; round 1 again on the new worker; round 2


# ------------------------------------------------------------- Anthropic dialect


def anthropic_model(body: dict[str, Any]) -> str | FakeReply:
    """Two rounds in Anthropic's shapes: add 2+3, then answer from the result."""
    content = body["messages"][-1]["content"]
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    results = [text_of(b.get("content")) for b in blocks if b.get("type") == "tool_result"]
    if results:
        return "Sum: " + results[0]
    return FakeReply("Calculating.", [("calc__add", '{"a": 2, "b": 3}')])


def test_anthropic_dialect_agent_loop(tmp_path_factory: pytest.TempPathFactory) -> None:
    with FakeAnthropic(reply=anthropic_model) as up:
        config = base_config(None)
        config["models"]["providers"]["claude"] = {"api": "anthropic-messages",
                                                   "baseUrl": up.base_url, "apiKey": "k"}
        config["agents"]["defaults"]["model"] = "claude/claude-test"
        config["agents"]["list"] = [{"id": "main", "default": True, "tools": {
            "mcpServers": {"calc": {"command": stdio_command()}}}}]
        st = Stack.start(tmp_path_factory.mktemp("anthropic-tools"), cast(FakeOpenAI, up),
                         config, gateways=1, workers=1)
        try:
            reply = ask(st.url, "add please")
        finally:
            st.stop()
        assert reply.choices[0].message.content == "Calculating.\n\nSum: 5"
        second = up.requests[-1].body
        use = [b for b in second["messages"][-2]["content"] if b["type"] == "tool_use"]
        assert [(b["name"], b["input"]) for b in use] == [("calc__add", {"a": 2, "b": 3})]
        (result,) = second["messages"][-1]["content"]
        assert result["type"] == "tool_result" and result["tool_use_id"] == use[0]["id"]
