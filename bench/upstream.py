"""A fast fake OpenAI-compatible upstream for benchmarks.

One process, one uvloop event loop, a raw :class:`asyncio.Protocol` with a
hand-rolled HTTP/1.1 keep-alive parser and pre-encoded response bytes, so that it
is never the bottleneck of a benchmark (``python -m bench.run`` measures its
ceiling in every run)::

    python -m bench.upstream --port 0 --tokens 32 --token-delay-ms 0
    # prints: listening on http://127.0.0.1:PORT   (then point clients at …/v1)

Routes:

* ``POST /v1/chat/completions`` — JSON (``stream`` false/absent) or SSE
  (``stream: true``): a role chunk, one chunk per token, a finish chunk
  (``finish_reason: "stop"``), a usage chunk (``choices: []``) and ``data: [DONE]``.
  Token ``k`` of a stream is sent ``k × delay`` after the request arrived
  (absolute schedule: pacing never drifts under load); token 0 goes out at once,
  together with the response head and the role chunk.
* ``GET /v1/models``, ``GET /health``.
* ``GET /bench/log`` — the request log (see below) as JSON, emptied by the read.

The reply's shape comes from the request's ``model``: a name ending in
``-t<N>`` or ``-t<N>-d<MS>`` (``fake-t32-d20``: 32 tokens, 20 ms apart) overrides
``--tokens`` / ``--token-delay-ms``; then, optionally:

* ``-tools<K>`` (``fake-t32-d0-tools4``): an agent's tool loop. The reply is one
  tool call (to the first tool the request declares, else ``bench__echo``, with
  arguments ``{"text": "r<round>"}``; finish reason ``tool_calls``) as long as the
  conversation after its last user message holds fewer than K tool results, then
  the text answer. So a run costs K + 1 upstream calls and K tool calls.
* ``-log`` (``fake-t32-d0-log``, ``fake-t32-d0-tools4-log``): the request is
  logged. Per request: ``t_in`` (``time.monotonic()`` when it had been read),
  ``t_out`` (when the last byte of the response had been handed to the socket),
  ``marker`` (the text of the last user message), ``history`` (the texts of the
  earlier user messages, in order), ``messages`` (how many) and ``tool_results``
  (tool results after the last user message). ``CLOCK_MONOTONIC`` is the same
  clock in every process of the machine, so the times line up with other logs.
  Opt-in by model name, so the other scenarios never pay for it.

So systems under test need no per-scenario
configuration other than routing a model name through. Token ``k``'s text is
``"w<k> "``: one whitespace-separated word per token, so a client can count tokens
even when a gateway coalesces several into one delta.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

import orjson

__all__ = ["ReplyShape", "Responses", "Server", "main", "serve", "tool_call_response"]

MODEL_RE = re.compile(r"-t(\d+)(?:-d(\d+(?:\.\d+)?))?(?:-tools(\d+))?(-log)?$")
DEFAULT_TOOL = "bench__echo"
MAX_TOKENS = 100_000
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
PROMPT_TOKENS = 8


@dataclass(frozen=True, slots=True)
class ReplyShape:
    model: str
    tokens: int
    delay_ms: float
    tool_rounds: int = 0  # -tools<K>: K rounds of one tool call before the text
    log: bool = False  # -log: every request is logged (Server.log)


def token_text(k: int) -> str:
    return f"w{k} "


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class Responses:
    """Pre-encoded responses for one reply shape (built once, reused for every request)."""

    __slots__ = ("head", "json_response", "shape", "stream_all", "tail", "token_chunks")

    def __init__(self, shape: ReplyShape, created: int) -> None:
        self.shape = shape
        model = shape.model
        cid = "chatcmpl-bench"
        texts = [token_text(k) for k in range(shape.tokens)]
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": shape.tokens,
                 "total_tokens": PROMPT_TOKENS + shape.tokens}
        body = orjson.dumps({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "".join(texts),
                                     "refusal": None}}],
            "usage": usage,
        })
        self.json_response = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            return _chunk(orjson.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}],
            }))

        role = chunk({"role": "assistant", "content": ""})
        self.token_chunks = [chunk({"content": text}) for text in texts]
        finish = chunk({}, "stop")
        usage_chunk = _chunk(orjson.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage,
        }))
        done = _chunk(b"[DONE]")
        response_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        first = self.token_chunks[:1]
        self.head = b"".join([response_head, role, *first])
        self.tail = finish + usage_chunk + done + b"0\r\n\r\n"
        self.stream_all = self.head + b"".join(self.token_chunks[1:]) + self.tail


def tool_call_response(model: str, created: int, name: str, round_: int, *,
                       stream: bool) -> bytes:
    """The whole response asking for one call of tool ``name`` (round ``round_``)."""
    cid = "chatcmpl-bench"
    call = {"id": f"call_bench_{round_}", "type": "function",
            "function": {"name": name, "arguments": orjson.dumps({"text": f"r{round_}"}).decode()}}
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1,
             "total_tokens": PROMPT_TOKENS + 1}
    if not stream:
        body = orjson.dumps({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                         "message": {"role": "assistant", "content": None, "refusal": None,
                                     "tool_calls": [call]}}],
            "usage": usage})
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _chunk(orjson.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": None}]}))

    return b"".join([
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]}),
        chunk({}, "tool_calls"),
        _chunk(orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [], "usage": usage})),
        _chunk(b"[DONE]"), b"0\r\n\r\n"])


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text") or "") for part in content
                       if isinstance(part, dict))
    return ""


def _conversation(request: dict[str, Any]) -> tuple[str, list[str], int, int]:
    """(last user text, earlier user texts, message count, tool results after the
    last user message) of a chat completion request."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return "", [], 0, 0
    users = [_text(m.get("content")) for m in messages
             if isinstance(m, dict) and m.get("role") == "user"]
    results = 0
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") == "user":
            break
        results += message.get("role") == "tool"
    return (users[-1] if users else ""), users[:-1], len(messages), results


def _first_tool(request: dict[str, Any]) -> str:
    tools = request.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        function = tools[0].get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return DEFAULT_TOOL


def _simple(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, content_type, len(body), body))


def _error(status: bytes, message: str) -> bytes:
    return _simple(status, orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": None}}))


HEALTH = _simple(b"200 OK", b'{"ok":true}')
NOT_FOUND = _error(b"404 Not Found", "no such route")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Server:
    """Reply shapes and their pre-encoded responses, shared by all connections."""

    def __init__(self, tokens: int, delay_ms: float) -> None:
        self.default_tokens = tokens
        self.default_delay_ms = delay_ms
        self.created = int(time.time())
        self._cache: dict[str, Responses] = {}
        self._tool_cache: dict[tuple[str, str, int, bool], bytes] = {}
        self.requests = 0
        # Requests of ``-log`` models (see the module docstring), until read.
        self.log: list[dict[str, Any]] = []
        self.models = _simple(b"200 OK", orjson.dumps(
            {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                         "owned_by": "bench"}]}))

    def responses(self, model: str) -> Responses:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        tokens, delay = self.default_tokens, self.default_delay_ms
        rounds, log = 0, False
        match = MODEL_RE.search(model)
        if match:
            tokens = int(match.group(1))
            if match.group(2) is not None:
                delay = float(match.group(2))
            rounds = int(match.group(3) or 0)
            log = match.group(4) is not None
        tokens = max(1, min(tokens, MAX_TOKENS))
        built = Responses(ReplyShape(model, tokens, delay, rounds, log), self.created)
        if len(self._cache) < 1000:
            self._cache[model] = built
        return built

    def tool_call(self, model: str, name: str, round_: int, *, stream: bool) -> bytes:
        key = (model, name, round_, stream)
        cached = self._tool_cache.get(key)
        if cached is None:
            cached = tool_call_response(model, self.created, name, round_, stream=stream)
            if len(self._tool_cache) < 1000:
                self._tool_cache[key] = cached
        return cached

    def log_response(self) -> bytes:
        """``GET /bench/log``: the log so far, which the read empties."""
        entries, self.log = self.log, []
        return _simple(b"200 OK", orjson.dumps({"entries": entries}))

    def protocol(self) -> Connection:
        return Connection(self)


class Connection(asyncio.Protocol):
    """One client connection: parse requests in order, answer each in turn."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a paced stream is being sent; later requests wait
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.sent_continue = False
        self.close_after_stream = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def process(self) -> None:
        """Handle every complete request in the buffer (stopping at a paced stream)."""
        transport = self.transport
        assert transport is not None
        while not self.busy and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    transport.write(_error(b"431 Request Header Fields Too Large", "head"))
                    self.close()
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                transport.write(_error(b"400 Bad Request", "bad request line"))
                self.close()
                return
            method, target, version = parts
            length = 0
            chunked = keep_alive_header = close_header = expect = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        length = -1
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    lowered = value.lower()
                    close_header = b"close" in lowered
                    keep_alive_header = b"keep-alive" in lowered
                elif name == b"expect":
                    expect = b"100-continue" in value.lower()
            if length < 0 or length > MAX_BODY:
                transport.write(_error(b"400 Bad Request", "bad content-length"))
                self.close()
                return
            start = end + 4
            if chunked:
                decoded = _dechunk(buf, start)
                if decoded is None:
                    if expect and not self.sent_continue:
                        self.sent_continue = True
                        transport.write(CONTINUE)
                    return
                body, consumed = decoded
            else:
                if len(buf) < start + length:
                    if expect and not self.sent_continue:
                        self.sent_continue = True
                        transport.write(CONTINUE)
                    return
                body, consumed = bytes(buf[start:start + length]), start + length
            del buf[:consumed]
            self.sent_continue = False
            keep_alive = (not close_header) if version == b"HTTP/1.1" else keep_alive_header
            self.server.requests += 1
            self.dispatch(method, target.split(b"?", 1)[0], body)
            if not keep_alive and not self.busy:
                self.close()
                return
            if not keep_alive:
                self.close_after_stream = True

    def dispatch(self, method: bytes, path: bytes, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if path == b"/v1/chat/completions" and method == b"POST":
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                transport.write(_error(b"400 Bad Request", "body is not JSON"))
                return
            if not isinstance(request, dict):
                transport.write(_error(b"400 Bad Request", "body is not a JSON object"))
                return
            model = request.get("model")
            responses = self.server.responses(model if isinstance(model, str) else "fake")
            shape = responses.shape
            entry: dict[str, Any] | None = None
            stream = request.get("stream") is True
            results = 0
            if shape.log or shape.tool_rounds:
                marker, history, count, results = _conversation(request)
                if shape.log:
                    entry = {"t_in": time.monotonic(), "t_out": None, "marker": marker,
                             "history": history, "messages": count,
                             "tool_results": results}
                    self.server.log.append(entry)
            if results < shape.tool_rounds:
                transport.write(self.server.tool_call(shape.model, _first_tool(request),
                                                      results, stream=stream))
            elif not stream:
                transport.write(responses.json_response)
            elif shape.delay_ms <= 0 or len(responses.token_chunks) <= 1:
                transport.write(responses.stream_all)
            else:
                self.start_stream(responses, entry)
                return
            if entry is not None:
                entry["t_out"] = time.monotonic()
        elif method == b"GET" and path == b"/bench/log":
            transport.write(self.server.log_response())
        elif method == b"GET" and path in (b"/health", b"/healthz", b"/"):
            transport.write(HEALTH)
        elif method == b"GET" and path == b"/v1/models":
            transport.write(self.server.models)
        else:
            transport.write(NOT_FOUND)

    def start_stream(self, responses: Responses, entry: dict[str, Any] | None = None) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(responses.head)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        delay = responses.shape.delay_ms / 1000.0
        chunks = responses.token_chunks

        def send(k: int) -> None:
            self.timer = None
            if self.closed or self.transport is None:
                return
            self.transport.write(chunks[k])
            if k + 1 < len(chunks):
                self.timer = loop.call_at(t0 + (k + 1) * delay, send, k + 1)
                return
            self.transport.write(responses.tail)
            if entry is not None:
                entry["t_out"] = time.monotonic()
            self.busy = False
            if self.close_after_stream:
                self.close()
            elif self.buf:
                self.process()

        self.timer = loop.call_at(t0 + delay, send, 1)


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at ``start``: (body, end offset), None if incomplete."""
    out = bytearray()
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0].strip() or b"0", 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)
            while trailer_end > pos:  # skip trailer fields
                pos = trailer_end + 2
                trailer_end = buf.find(b"\r\n", pos)
            if trailer_end < 0:
                return None
            return bytes(out), trailer_end + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


async def serve(host: str, port: int, tokens: int, delay_ms: float,
                ready: asyncio.Future[int] | None = None) -> None:
    """Serve until cancelled; ``ready`` gets the bound port."""
    server = Server(tokens, delay_ms)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server.protocol, host, port, backlog=4096, reuse_address=True)
    bound = srv.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    else:
        print(f"listening on http://{host}:{bound}", flush=True)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--tokens", type=int, default=32,
                        help="tokens per reply unless the model name says -t<N>")
    parser.add_argument("--token-delay-ms", type=float, default=0.0,
                        help="pacing of streamed tokens unless the model name says -d<MS>")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash leaves a trace in the log
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    coro = serve(args.host, args.port, args.tokens, args.token_delay_ms)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(coro)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # Say why we stop: a benchmark whose upstream vanished must be explainable.
    print(f"upstream: stopping on {signal.Signals(signum).name} "
          f"(from the harness or another process)", file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
