"""OpenTelemetry tracing end to end (SPEC §13): ``clawbus up`` with two workers
exporting OTLP/HTTP to a receiver of the test's own (tests/fakes/otlp_receiver.py).

- a streamed session turn sent with the official SDK and a client ``traceparent``
  is ONE trace: the gateway's SERVER span (a child of the client's span), the bus
  publish (PRODUCER), the worker's run (CONSUMER) with its phases, and the model
  call (CLIENT) with the GenAI attributes; the upstream got the model call's
  ``traceparent``; no prompt text in any span (content capture off); the JSON
  log lines of the run carry its trace and span ids;
- an agent tool call is a span under the run, and the MCP server saw its
  ``traceparent`` in ``_meta``;
- a WebSocket ``agent`` run continues the upgrade request's trace; an
  embeddings request is an ``embeddings`` model call; a failed model call is
  an ERROR span with its exception, and so is the run;
- a run whose worker is SIGKILLed before any text is retried, both attempts in
  the client's trace (``clawbus.attempt`` 1 and 2).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import websockets

from tests.fakes.http_upstream import FakeReply, text_of
from tests.fakes.mcp_servers import stdio_command
from tests.fakes.otlp_receiver import OtlpReceiver, Span
from tests.faultkit import FaultyOpenAI
from tests.helpers import TOKEN, base_config, sdk_client
from tests.procs import Proc, clawbus_up, wait_until, write_config

REPO = Path(__file__).resolve().parent.parent


def model(body: dict[str, Any]) -> str | FakeReply:
    """Plain replies; a question with "meta" calls the agent tool ``calc__meta``
    first and answers with what it returned."""
    messages = body["messages"]
    question = next(text_of(m["content"]) for m in reversed(messages) if m["role"] == "user")
    results = [text_of(m["content"]) for m in messages if m["role"] == "tool"]
    if "meta" in question and not results:
        return FakeReply("", [("calc__meta", "{}")])
    if results:
        return "Tool said: " + results[-1]
    return "plain: " + question


@dataclass
class Traced:
    up: Proc
    url: str
    receiver: OtlpReceiver
    upstream: FaultyOpenAI


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    directory = tmp_path_factory.mktemp("tracing")
    with OtlpReceiver() as receiver, FaultyOpenAI(reply=model) as upstream:
        config = base_config(upstream)
        config["agents"]["list"][1]["tools"] = {
            "mcpServers": {"calc": {"command": stdio_command(), "cwd": str(REPO)}}}
        # Through the config (passed to every child by `clawbus up`); the batch
        # processor's delay through the standard variable, for quick exports.
        config["telemetry"] = {"otlp": {"endpoint": receiver.endpoint}}
        config["agents"]["defaults"]["embeddingModel"] = "fake/embed-test"
        path = write_config(directory / "clawbus.json5", config)
        with clawbus_up(path, directory / "state",
                        args=["--grace", "3", "--log-format", "json", "--log-level", "debug"],
                        env={"OTEL_BSP_SCHEDULE_DELAY": "50"}) as (up, url):
            yield Traced(up, url, receiver, upstream)


def client_parent() -> tuple[str, str, str]:
    """(trace id, span id, traceparent) of a client's own span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def streamed(url: str, text: str, traceparent: str, **headers: str) -> tuple[str, str]:
    """A streamed session turn: (run id, the reply's text)."""
    with sdk_client(url) as client:
        stream = client.chat.completions.create(
            model="openclaw", user=f"trace-{uuid.uuid4().hex[:8]}", stream=True,
            messages=[{"role": "user", "content": text}],
            extra_headers={"traceparent": traceparent, **headers})
        chunks = list(stream)
    return chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def kinds(spans: list[Span], trace_id: str) -> set[str]:
    return {s.kind for s in spans if s.trace_id == trace_id}


def one(spans: list[Span], **where: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, (where, found)
    return found[0]


def test_a_streamed_turn_is_one_trace_from_client_to_upstream(traced: Traced) -> None:
    trace_id, client_span, traceparent = client_parent()
    secret = f"prompt-{uuid.uuid4().hex}"
    run_id, text = streamed(traced.url, f"hello {secret}", traceparent)
    assert text == f"plain: hello {secret}"
    traced.receiver.wait_for(lambda spans: {"server", "producer", "consumer", "client"}
                             <= kinds(spans, trace_id))
    spans = traced.receiver.trace(trace_id)

    server = one(spans, kind="server")
    assert server.parent_id == client_span
    assert server.name == "POST /v1/chat/completions"
    assert server.service == "clawbus-gateway"
    assert str(server.resource["service.instance.id"]).startswith("gw")
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["clawbus.run_id"] == run_id
    assert not server.error

    producer = one(spans, kind="producer")
    assert producer.parent_id == server.span_id
    assert producer.attributes["messaging.system"] == "nats"

    consumer = one(spans, kind="consumer")
    assert consumer.parent_id == producer.span_id
    assert consumer.service == "clawbus-worker"
    assert str(consumer.resource["service.instance.id"]).startswith("w-")
    assert consumer.attributes["clawbus.run_id"] == run_id
    assert consumer.attributes["clawbus.attempt"] == 1
    assert consumer.attributes["clawbus.agent_id"] == "main"
    assert str(consumer.attributes["clawbus.session_key"]).startswith("agent:main:")
    assert consumer.attributes["clawbus.queue_wait_ms"] >= 0
    assert consumer.attributes["clawbus.outcome"] == "completed"
    for phase in ("session lease", "history read", "transcript append"):
        assert one(spans, name=phase).parent_id == consumer.span_id, phase

    call = one(spans, kind="client")
    assert call.parent_id == consumer.span_id
    assert call.name == "chat gpt-test"
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.system"] == "openai"
    assert call.attributes["gen_ai.request.model"] == "gpt-test"
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["gen_ai.usage.output_tokens"] > 0
    assert [e.name for e in call.events] == ["gen_ai.first_token"]
    assert server.start_ns <= producer.start_ns <= consumer.start_ns <= call.start_ns
    assert call.end_ns <= consumer.end_ns

    # The upstream request continued the model call's span.
    (request,) = [r for r in traced.upstream.requests if secret in json.dumps(r.body)]
    assert request.headers["traceparent"] == f"00-{trace_id}-{call.span_id}-01"

    # Probes make no spans (the fixture polled /readyz).
    assert not [s for s in traced.receiver.spans if s.attributes.get("url.path") == "/readyz"]

    # Content capture is off: the prompt is nowhere in the spans.
    assert not [s.name for s in spans if secret in s.text()]

    # The run's JSON log lines carry its trace and the span they were logged in.
    def traced_lines() -> list[dict[str, Any]]:
        logged = [json.loads(line) for line in list(traced.up.lines)
                  if line.startswith("{") and run_id in line]
        return [entry for entry in logged if entry.get("trace_id") == trace_id]

    wait_until(lambda: bool(traced_lines()))  # (the output pipe is read by a thread)
    span_ids = {s.span_id for s in spans}
    assert all(entry["span_id"] in span_ids for entry in traced_lines())


def test_an_agent_tool_call_is_a_span_and_its_server_sees_the_traceparent(
        traced: Traced) -> None:
    trace_id, _, traceparent = client_parent()
    _, text = streamed(traced.url, "show me your meta", traceparent,
                       **{"x-openclaw-agent-id": "beta"})
    traced.receiver.wait_for(lambda spans: any(
        s.trace_id == trace_id and s.kind == "consumer" for s in spans))
    spans = traced.receiver.trace(trace_id)
    consumer = one(spans, kind="consumer")
    tool = one(spans, name="execute_tool calc__meta")
    assert tool.parent_id == consumer.span_id
    assert tool.attributes["gen_ai.tool.name"] == "calc__meta"
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert not tool.error
    calls = [s for s in spans if s.kind == "client"]
    assert len(calls) == 2 and all(c.parent_id == consumer.span_id for c in calls)
    # The tool answered with the _meta it was sent.
    meta = json.loads(text.removeprefix("Tool said: "))
    assert meta["traceparent"] == f"00-{trace_id}-{tool.span_id}-01"
    assert meta["clawbus/toolCallId"]


async def ws_agent(url: str, text: str, traceparent: str) -> str:
    """An ``agent`` run over a WebSocket whose upgrade request sent ``traceparent``;
    its run id."""
    async with websockets.connect(url.replace("http", "ws") + "/",
                                  additional_headers={"traceparent": traceparent}) as ws:
        await ws.recv()  # connect.challenge
        await ws.send(orjson.dumps({"type": "req", "id": 1, "method": "connect", "params": {
            "minProtocol": 3, "maxProtocol": 3, "client": {"id": "test"},
            "auth": {"token": TOKEN}}}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"type": "req", "id": 2, "method": "agent",
                                    "params": {"message": text}}).decode())
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "res" and frame["id"] == 2 \
                    and frame["payload"].get("status") == "ok":
                return str(frame["payload"]["runId"])


async def test_a_websocket_agent_run_continues_the_upgrade_requests_trace(
        traced: Traced) -> None:
    trace_id, client_span, traceparent = client_parent()
    run_id = await ws_agent(traced.url, "hello over ws", traceparent)
    spans = await asyncio.to_thread(traced.receiver.wait_for, lambda spans: {
        "server", "consumer"} <= kinds(spans, trace_id))
    spans = [s for s in spans if s.trace_id == trace_id]
    run = one(spans, kind="server")
    assert run.name == "agent" and run.parent_id == client_span
    assert run.attributes["clawbus.run_id"] == run_id
    producer = one(spans, kind="producer")
    assert producer.parent_id == run.span_id
    assert one(spans, kind="consumer").parent_id == producer.span_id


def test_embeddings_are_a_model_call_of_their_own(traced: Traced) -> None:
    trace_id, _, traceparent = client_parent()
    with sdk_client(traced.url) as client:
        client.embeddings.create(model="openclaw", input=["one", "two"],
                                 extra_headers={"traceparent": traceparent})
    # (the worker's run span ends after its provider call: wait for both)
    traced.receiver.wait_for(
        lambda spans: {"server", "client", "consumer"} <= kinds(spans, trace_id))
    spans = traced.receiver.trace(trace_id)
    assert one(spans, kind="server").name == "POST /v1/embeddings"
    call = one(spans, kind="client")
    assert call.name == "embeddings embed-test"
    assert call.attributes["gen_ai.operation.name"] == "embeddings"
    assert call.attributes["gen_ai.request.model"] == "embed-test"
    assert call.parent_id == one(spans, kind="consumer").span_id


def test_a_failed_model_call_is_an_error_span(traced: Traced) -> None:
    trace_id, _, traceparent = client_parent()
    traced.upstream.fail_status = 500
    try:
        with sdk_client(traced.url) as client, pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": "fail please"}],
                extra_headers={"traceparent": traceparent})
    finally:
        traced.upstream.fail_status = None
    traced.receiver.wait_for(lambda spans: {"server", "consumer", "client"}
                             <= kinds(spans, trace_id))
    spans = traced.receiver.trace(trace_id)
    call, run = one(spans, kind="client"), one(spans, kind="consumer")
    assert call.error and run.error
    assert [e.name for e in call.events if e.name == "exception"] == ["exception"]
    assert run.attributes["clawbus.outcome"] == "failed"
    assert one(spans, kind="server").error  # answered 5xx


def test_a_retried_run_has_both_attempts_in_the_clients_trace(traced: Traced) -> None:
    """Runs last in the module: it kills one of the two workers."""
    trace_id, _, traceparent = client_parent()
    marker = f"killme-{uuid.uuid4().hex[:8]}"
    held: list[int] = []

    def head_delay(body: dict[str, Any]) -> float:
        if marker in json.dumps(body) and not held:
            held.append(1)
            return 60.0  # the first attempt never sees text: its worker dies first
        return 0.0

    traced.upstream.head_delay = head_delay
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(streamed, traced.url, marker, traceparent)
            spans = traced.receiver.wait_for(lambda spans: any(
                s.trace_id == trace_id and s.name == "history read" for s in spans))
            first = one([s for s in spans if s.trace_id == trace_id], name="history read")
            assert first.attributes["clawbus.attempt"] == 1
            worker_id = str(first.resource["service.instance.id"])
            traced.upstream.wait_for(lambda records: any(
                marker in json.dumps(r.body) for r in records))
            os.kill(int(worker_id.split("-")[-2]), signal.SIGKILL)
            _, text = reply.result(timeout=60)
    finally:
        traced.upstream.head_delay = lambda body: 0.0
    assert text == f"plain: {marker}"
    traced.receiver.wait_for(lambda spans: any(
        s.trace_id == trace_id and s.kind == "consumer" for s in spans))
    spans = traced.receiver.trace(trace_id)
    producer = one(spans, kind="producer")
    consumer = one(spans, kind="consumer")  # the first attempt's never ended
    assert consumer.attributes["clawbus.attempt"] == 2
    assert consumer.parent_id == producer.span_id
    assert str(consumer.resource["service.instance.id"]) != worker_id
    attempts = {s.attributes.get("clawbus.attempt") for s in spans
                if s.kind not in ("server", "producer")}
    assert attempts == {1, 2}
