"""Hostile input (issue #4): property-based and schema-driven fuzzing of
``POST /v1/chat/completions`` and of WebSocket frames, plus the classic nasties -
oversized and deeply nested bodies, invalid UTF-8, huge message lists, NUL and
control characters in session keys - and auth over both doors.

Everything runs in-process (:mod:`tests.hostile`): the real ASGI app against a
real ``nats-server``, with a real worker on the offline ``echo`` provider, so
requests that pass validation run the whole bus path. The bar for every one of
the >10,000 generated requests: no 5xx, no error frame, no log record at ERROR
or with a traceback, and every response in its documented shape (OpenAI's
JSON Schemas for completions, chunks and the error envelope).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from bus import subjects
from bus.transcripts import Transcripts
from clawbus.natsserver import NatsServer
from gateway import auth as auth_module
from tests.helpers import TOKEN, base_config
from tests.hostile import Headers, HttpResult, InProcess, check_http
from tests.schemas import validate

URL = "/v1/chat/completions"
AUTH: Headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
JSON_CT: Headers = [(b"content-type", b"application/json")]
MAX_BODY = 256 * 1024

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

STATS: Counter[str] = Counter()


def fuzz_config(**bus: Any) -> dict[str, Any]:
    config = base_config(None, queueTimeoutSeconds=10, **bus)
    config["gateway"]["auth"]["rateLimit"] = {"maxAttempts": 3, "windowSeconds": 60,
                                              "lockoutSeconds": 120}
    config["gateway"]["http"]["endpoints"]["chatCompletions"]["maxBodyBytes"] = MAX_BODY
    return config


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("hostile") / "nats") as server:
        yield server


@pytest.fixture(scope="module")
def gw(nats: NatsServer) -> Iterator[InProcess]:
    with InProcess(fuzz_config(), nats.url) as harness:
        yield harness
        assert harness.logs.problems() == []


def post(gw: InProcess, body: bytes, headers: Headers | None = None, *, auth: bool = True,
         client: tuple[str, int] | None = None) -> HttpResult:
    return gw.http("POST", URL, [*(AUTH if auth else []), *JSON_CT, *(headers or [])], body,
                   client=client)


# --------------------------------------------------------------------------- strategies

NASTY = ".*>$ \t\r\n\x00\x01\x07\x1b\x1f\x7f\x85\xa0é中😀\u200b\u202e\ufeff\\\"'/{}[]:"
nasty_text = st.text(alphabet=st.sampled_from(NASTY), max_size=12)
any_text = st.one_of(st.text(max_size=40), nasty_text,
                     st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
surrogates = st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                     min_size=1, max_size=3)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), any_text)
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(any_text, kids, max_size=4)), max_leaves=10)
words = st.lists(st.sampled_from(["hello", "world", "a", "b", "😀", "é", "x.y", "*", ">"]),
                 min_size=1, max_size=6).map(" ".join)
texts = st.one_of(words, any_text, surrogates)

roles = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool",
                                   "function", "User", "", "bogus"]), scalars)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(
        ["text", "input_text", "image_url", "input_image", "bogus"]), scalars)},
        optional={"text": st.one_of(texts, scalars), "image_url": json_values}),
    json_values)
contents = st.one_of(texts, st.lists(parts, max_size=4), scalars)
messages = st.one_of(
    st.lists(st.one_of(
        st.fixed_dictionaries({"role": roles}, optional={
            "content": contents, "name": st.one_of(texts, scalars),
            "tool_call_id": st.one_of(texts, scalars)}),
        json_values), max_size=6),
    json_values)
numbers = st.one_of(st.integers(-5, 5), st.floats(-3, 3), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), scalars)
models = st.one_of(st.sampled_from(
    ["openclaw", "openclaw/default", "openclaw/main", "openclaw:beta", "agent:BETA",
     "OpenClaw", " openclaw ", "openclaw/", "openclaw/nope", "gpt-4o", "", "agent:"]), scalars)
chat_bodies = st.fixed_dictionaries({}, optional={
    "model": models, "messages": messages,
    "stream": st.one_of(st.booleans(), scalars),
    "stream_options": st.one_of(st.fixed_dictionaries(
        {}, optional={"include_usage": st.one_of(st.booleans(), scalars)}), json_values),
    "user": st.one_of(texts, scalars),
    "temperature": numbers, "top_p": numbers, "frequency_penalty": numbers,
    "presence_penalty": numbers, "max_tokens": numbers, "max_completion_tokens": numbers,
    "seed": numbers, "stop": st.one_of(texts, st.lists(texts, max_size=6), scalars),
    "n": numbers, "tools": json_values, "response_format": json_values,
})
# Valid requests (with hostile but legal text), and valid ones with one field broken.
ok_text = st.one_of(words, st.text(alphabet=st.characters(codec="utf-8"), min_size=1,
                                   max_size=20))
ok_messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "function"]),
    "content": st.one_of(ok_text, st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["text", "input_text"]), "text": ok_text}), max_size=2))},
    optional={"name": words}), max_size=3).flatmap(
    lambda ms: words.map(lambda w: [*ms, {"role": "user", "content": w}]))
valid_bodies = st.fixed_dictionaries({
    "model": st.sampled_from(["openclaw", "openclaw/default", "openclaw/beta", "OPENCLAW:main",
                              "agent:beta", " openclaw ", ""]),
    "messages": ok_messages}, optional={
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": ok_text, "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
    "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
    "max_tokens": st.integers(1, 50), "max_completion_tokens": st.integers(1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(ok_text, st.lists(ok_text, max_size=4)), "n": json_values,
    "metadata": json_values})
broken_bodies = st.tuples(valid_bodies, st.sampled_from(
    ["model", "messages", "stream", "stream_options", "user", "temperature", "top_p",
     "frequency_penalty", "presence_penalty", "max_tokens", "max_completion_tokens", "seed",
     "stop"]), json_values).map(lambda t: {**t[0], t[1]: t[2]})
header_values = st.one_of(nasty_text.map(lambda s: s.encode("utf-8")),
                          st.binary(max_size=40), st.text(max_size=20).map(str.encode))
optional_headers = st.lists(st.tuples(
    st.sampled_from([b"x-openclaw-session-key", b"x-openclaw-agent-id", b"x-openclaw-agent",
                     b"content-type", b"content-length", b"transfer-encoding"]),
    header_values), max_size=3)


def encode(body: Any) -> bytes:
    """The stdlib encoder: arbitrary ints, NaN/Infinity literals, lone surrogates as
    escapes - all things a hostile client may send and orjson must refuse."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


# --------------------------------------------------------------------------- HTTP fuzzing


def _report(name: str, stats: Counter[str]) -> None:
    print(f"\n{name}: {sum(stats.values())} requests, {dict(sorted(stats.items()))}")


@pytest.mark.slow
def test_fuzz_chat_requests(gw: InProcess) -> None:
    """Structured but hostile chat bodies and headers: each answer is a documented
    one; a good share get through validation and run on the worker."""
    stats: Counter[str] = Counter()

    @settings(FUZZ, max_examples=3000)
    @given(body=st.one_of(valid_bodies, broken_bodies, chat_bodies), headers=optional_headers)
    def fuzz(body: dict[str, Any], headers: Headers) -> None:
        stats[check_http(post(gw, encode(body), headers))] += 1

    fuzz()
    _report("chat fuzz", stats)
    STATS.update(stats)
    assert sum(stats.values()) >= 3000
    assert stats["200 json"] + stats["200 stream"] >= 200  # the run path was exercised
    assert gw.logs.problems() == []


@pytest.mark.slow
def test_fuzz_raw_bodies_auth_and_methods(gw: InProcess) -> None:
    """Arbitrary bytes as the body, arbitrary Authorization headers, other methods.
    Clients are loopback here, so wrong secrets are never locked out."""
    stats: Counter[str] = Counter()

    @settings(FUZZ, max_examples=5000)
    @given(body=st.one_of(st.binary(max_size=300), json_values.map(encode),
                          st.binary(max_size=40).map(lambda b: b'{"messages":"' + b + b'"}')),
           authorization=st.one_of(
               st.sampled_from([f"Bearer {TOKEN}".encode()] * 6 + [
                   f"bearer {TOKEN} ".encode(), b"Bearer", b"Basic " + TOKEN.encode()]),
               st.none(), st.binary(max_size=60)),
           method=st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE", "OPTIONS"]))
    def fuzz(body: bytes, authorization: bytes | None, method: str) -> None:
        headers = [(b"authorization", authorization)] if authorization is not None else []
        resp = gw.http(method, URL, [*headers, *JSON_CT], body, client=("127.0.0.1", 5000))
        stats[check_http(resp)] += 1

    fuzz()
    _report("raw fuzz", stats)
    STATS.update(stats)
    assert sum(stats.values()) >= 5000
    assert gw.logs.problems() == []


# --------------------------------------------------------------------------- schemathesis


def openapi_document() -> dict[str, Any]:
    """A minimal, hand-written OpenAPI document for the endpoint (the app serves none)."""
    text = {"type": "string", "maxLength": 64}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant",
                                            "tool", "function"]},
        "content": {"oneOf": [text, {"type": "array", "maxItems": 3, "items": {
            "type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["text", "input_text", "image_url"]},
                "text": text}}}]},
        "name": text}}
    request = {"type": "object", "properties": {
        "model": {"type": "string", "enum": ["openclaw", "openclaw/default", "openclaw/beta",
                                             "openclaw:main", "agent:beta"]},
        "messages": {"type": "array", "maxItems": 4, "items": message},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {
            "include_usage": {"type": "boolean"}}},
        "user": text,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 100},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 100},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "stop": {"oneOf": [text, {"type": "array", "maxItems": 4, "items": text}]}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"]}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "clawbus chat completions", "version": "1"},
        "paths": {URL: {"post": {
            "parameters": [
                {"name": "x-openclaw-session-key", "in": "header", "required": False,
                 "schema": {"type": "string", "maxLength": 80}},
                {"name": "x-openclaw-agent-id", "in": "header", "required": False,
                 "schema": {"type": "string", "enum": ["main", "beta", "MAIN"]}}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": request}}},
            "responses": {
                "200": {"description": "completion or SSE stream"},
                "400": {"description": "invalid", "content": {
                    "application/json": {"schema": error}}},
                "401": {"description": "unauthorized"},
                "413": {"description": "too large"},
                "429": {"description": "rate limited"}}}}}}


SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATION = SCHEMA[URL]["POST"]


def _case_request(case: Any) -> tuple[Headers, bytes]:
    headers: Headers = [(k.lower().encode("latin-1"), str(v).encode("utf-8"))
                        for k, v in (case.headers or {}).items()]
    body = case.body
    raw = body if isinstance(body, bytes) else encode(body)
    return headers, raw


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_chat_completions(gw: InProcess, mode: GenerationMode) -> None:
    """Schemathesis generates requests that fit a hand-written OpenAPI document of the
    endpoint (positive: every one must get 200 - the document only allows valid
    requests, except a missing user message) and requests that break it
    (negative: each gets a documented 4xx, or 200 where the break is harmless)."""
    stats: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(case=OPERATION.as_strategy(mode))
    def fuzz(case: Any) -> None:
        headers, raw = _case_request(case)
        resp = post(gw, raw, headers)
        kind = check_http(resp)
        if mode is GenerationMode.POSITIVE and kind == "400":
            # A schema-valid request may still break a rule the schema cannot say
            # (SPEC §7/§8): each such 400 names the field.
            message = resp.json()["error"]["message"]
            assert message == "Missing user message in `messages`." \
                or message.startswith(VALID_BUT_REFUSED), message
        stats[kind] += 1

    fuzz()
    _report(f"schemathesis {mode.value}", stats)
    STATS.update(stats)
    assert sum(stats.values()) >= 300
    assert gw.logs.problems() == []


# --------------------------------------------------------------------------- WebSocket fuzzing

CONNECT = orjson.dumps({"type": "req", "id": "c0", "method": "connect", "params": {
    "minProtocol": 3, "maxProtocol": 3, "client": {"id": "fuzz"}, "auth": {"token": TOKEN}}
                        }).decode()
ws_methods = st.one_of(st.sampled_from(
    ["health", "agents.list", "agent", "agent", "agent", "chat.abort", "chat.history",
     "sessions.reset", "sessions.list", "connect", "bogus", ""]), scalars)
agent_params = st.fixed_dictionaries({}, optional={
    "message": st.one_of(words, texts, scalars), "agentId": st.one_of(
        st.sampled_from(["main", "beta", "MAIN", "nope"]), scalars),
    "sessionKey": st.one_of(st.sampled_from(["fuzz-a", "fuzz-b"]), nasty_text, scalars),
    "extraSystemPrompt": st.one_of(texts, scalars), "runId": st.one_of(texts, scalars),
    "limit": numbers})
requests = st.builds(lambda i, m, p: {"type": "req", "id": i, "method": m, "params": p},
                     st.one_of(st.text(max_size=8), st.integers(), st.none()), ws_methods,
                     st.one_of(agent_params, json_values))
valid_agent = st.builds(
    lambda i, m, k, a: {"type": "req", "id": i, "method": "agent", "params": {
        "message": m, "sessionKey": k, "agentId": a}},
    st.text(max_size=6), ok_text.filter(str.strip),
    st.one_of(st.none(), st.sampled_from(["fuzz-a", "fuzz-b"]), nasty_text),
    st.sampled_from([None, "main", "beta", "BETA"]))
ws_frames = st.one_of(
    valid_agent.map(json.dumps),
    requests.map(lambda f: json.dumps(f, allow_nan=True)),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(max_size=40), st.binary(max_size=40))


@pytest.mark.slow
def test_fuzz_websocket_frames(ws_gw: InProcess) -> None:
    """Random frames after a valid (mostly) or random first frame: every request is
    answered with a well-formed ``res`` (runs end with a second one); a bad first
    frame closes the socket with 1008; the app never crashes."""
    stats: Counter[str] = Counter()

    @settings(FUZZ, max_examples=400)
    @given(connect=st.sampled_from([True] * 7 + [False]), other=ws_frames,
           rest=st.lists(ws_frames, max_size=6))
    def fuzz(connect: bool, other: str | bytes, rest: list[str | bytes]) -> None:
        first = CONNECT if connect else other
        _check_ws(ws_gw.websocket([first, *rest]), first, rest, stats)

    fuzz()
    _report("websocket fuzz", stats)
    STATS.update(stats)
    assert stats["frames"] >= 1000 and stats["runs"] >= 50
    assert ws_gw.logs.problems() == []


def _check_ws(result: Any, first: str | bytes, rest: list[str | bytes],
              stats: Counter[str]) -> None:
    assert result.accepted
    assert result.frames[0]["event"] == "connect.challenge"
    for frame in result.frames:
        assert frame["type"] in ("event", "res"), frame
        if frame["type"] == "res":
            assert isinstance(frame["ok"], bool)
            if frame["ok"]:
                assert isinstance(frame["payload"], dict)
            else:
                assert isinstance(frame["error"]["code"], str), frame
                assert isinstance(frame["error"]["message"], str), frame
        else:
            assert isinstance(frame["seq"], int) and isinstance(frame["payload"], dict)
    if first != CONNECT:
        hello = [f for f in result.frames if f.get("ok") and f["payload"].get("type") == "hello-ok"]
        if not hello:
            assert result.close_code == 1008, result
            stats["refused sockets"] += 1
            stats["frames"] += 1
            return
    assert result.close_code is None, result.frames
    res = [f for f in result.frames if f["type"] == "res"]
    runs = sum(1 for f in res if f["ok"] and f["payload"].get("status") == "accepted")
    assert len(res) >= len(rest) + 1 + runs, result.frames  # nothing left unanswered
    stats["runs"] += runs
    stats["frames"] += len(rest) + 1


@pytest.fixture(scope="module")
def ws_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    """A gateway of its own (so sessions.list stays small) for the WebSocket fuzz."""
    with NatsServer(tmp_path_factory.mktemp("hostile-ws") / "nats") as server, \
            InProcess(fuzz_config(), server.url) as harness:
        yield harness
        assert harness.logs.problems() == []


# --------------------------------------------------------------------------- classic nasties


def chat(content: Any, **extra: Any) -> bytes:
    return orjson.dumps({"model": "openclaw", "messages": [{"role": "user", "content": content}],
                         **extra})


def error_message(resp: HttpResult) -> str:
    check_http(resp)
    return str(resp.json()["error"]["message"])


def test_oversized_bodies(gw: InProcess) -> None:
    big = chat("x" * MAX_BODY)
    assert error_message(post(gw, big)) == "Payload too large"
    # Declared too large: refused before reading (even if the bytes are fewer).
    assert error_message(post(gw, b"{}", [(b"content-length", str(MAX_BODY + 1).encode())])
                         ) == "Payload too large"
    assert post(gw, b"{}", [(b"content-length", b"abc")]).status == 400
    assert error_message(post(gw, b"{}", [(b"content-length", b"99999999999999999999999")])
                         ) == "Payload too large"
    just_fits = chat("y" * (MAX_BODY - len(chat(""))))
    assert len(just_fits) == MAX_BODY
    ok = post(gw, just_fits)
    assert check_http(ok) == "200 json"


@pytest.fixture(scope="module")
def roomy(nats: NatsServer) -> Iterator[InProcess]:
    """A gateway taking bodies of up to 3 MB (the default is 20 MB)."""
    config = fuzz_config()
    config["gateway"]["http"]["endpoints"]["chatCompletions"]["maxBodyBytes"] = 3_000_000
    with InProcess(config, nats.url) as harness:
        yield harness


def test_message_too_large_for_the_bus_still_works(roomy: InProcess) -> None:
    """A body under maxBodyBytes whose run, turn or reply cannot fit one NATS
    message (1 MB) goes through the object buckets: no 413, no 5xx."""
    for text in ("z " * 600_000, "w " * 300_000):  # a 1.2 MB run; a 1.2 MB turn
        resp = post(roomy, chat(text))
        assert resp.status == 200, resp.body
        validate("chat_completion", resp.json())
        assert resp.json()["choices"][0]["message"]["content"] == text.strip()
    assert roomy.logs.problems() == []


VALID_BUT_REFUSED = ("`messages[", "`tools", "`tool_choice`", "`tool_call_id`")


def test_deeply_nested_json(gw: InProcess) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert error_message(post(gw, deep)).startswith("Invalid JSON body")
    nested_obj = b'{"a":' * 40_000 + b"1" + b"}" * 40_000
    assert error_message(post(gw, nested_obj)).startswith("Invalid JSON body")
    # Nesting orjson accepts (under its 1024 limit), where the parser looks for text.
    parts: Any = "deep"
    for _ in range(200):  # 400 levels: under orjson's limit of 1024
        parts = [{"type": "text", "text": parts}]
    body = encode({"model": "openclaw", "messages": [{"role": "user", "content": parts}]})
    assert error_message(post(gw, body)) == "Missing user message in `messages`."
    deep_extra = encode({"model": "openclaw", "metadata": {"x": parts},
                         "messages": [{"role": "user", "content": "fine"}]})
    assert check_http(post(gw, deep_extra)) == "200 json"
    deep_tools = encode({"model": "openclaw", "tools": parts,
                         "messages": [{"role": "user", "content": "fine"}]})
    assert error_message(post(gw, deep_tools)).startswith("`tools[0]` must be a function tool")


@pytest.mark.parametrize("raw", [
    b'{"model":"openclaw","messages":[{"role":"user","content":"\xff\xfe"}]}',
    b'{"model":"openclaw","messages":[{"role":"user","content":"\xc0\xaf"}]}',  # overlong
    b'{"model":"openclaw","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',  # surrogate
    b'{"model":"openclaw","messages":[{"role":"user","content":"\\ud800"}]}',  # lone escape
    b'{"model":"openclaw","messages":[{"role":"user","content":"ok"}]}\xff',
    b"\xef\xbb\xbf{}",  # a BOM
    b'{"model":"openclaw","temperature":NaN,"messages":[]}',
    b'{"model":"openclaw","max_tokens":1e999,"messages":[]}',
    b'{"model":"openclaw","seed":123456789012345678901234567890,"messages":[]}',
])
def test_invalid_utf8_and_json_oddities(gw: InProcess, raw: bytes) -> None:
    resp = post(gw, raw)
    assert resp.status == 400, resp.body
    check_http(resp)


def test_huge_number_of_messages(roomy: InProcess) -> None:
    many = [{"role": "user" if i % 2 else "assistant", "content": f"m{i}"}
            for i in range(20_000)]
    body = orjson.dumps({"model": "openclaw", "messages": many})
    resp = post(roomy, body)
    assert check_http(resp) == "200 json"
    assert resp.json()["choices"][0]["message"]["content"].endswith("User: m19999")


@pytest.mark.parametrize("key", [
    b"a.b", b"a.*", b"a.>", b"runs.>", b"\x00", b"a\x00b", b"\x01\x02\x1f\x7f", b"tx.\x00",
    b"key with spaces", b"\xff\xfe", b"$JS.API.>", b"%2e", b"a\tb",
])
def test_hostile_session_keys_get_their_own_session(gw: InProcess, key: bytes) -> None:
    """Session keys with subject separators, wildcards, NUL and control bytes run
    like any other key, and each lands on its own transcript."""
    tag_ = uuid.uuid4().hex[:8]
    resp = post(gw, chat(f"hello {tag_}"), [(b"x-openclaw-session-key", key + tag_.encode())])
    assert check_http(resp) == "200 json"
    turns = _turns(gw, (key + tag_.encode()).decode("latin-1").strip())
    assert [t.user for t in turns] == [f"hello {tag_}"]


def test_session_key_length_is_bounded(gw: InProcess) -> None:
    """Regression: a 5,000-character session key used to put a subject over NATS's
    4 kB control-line limit, and the server dropped the gateway's connection (every
    later request failed). Over-long keys are now refused with 400."""
    long_key = b"k" * 5000
    assert error_message(post(gw, chat("hi"), [(b"x-openclaw-session-key", long_key)])
                         ) == "`x-openclaw-session-key` is longer than 512 characters."
    assert error_message(post(gw, chat("hi", user="u" * 5000))
                         ) == "`user` is longer than 512 characters."
    assert check_http(post(gw, chat("still up"), [(b"x-openclaw-session-key", b"k" * 512)])
                      ) == "200 json"
    four_byte = "😀" * 512  # 2 kB of UTF-8: the longest key allowed
    assert check_http(post(gw, chat("wide", user=four_byte))) == "200 json"
    # The WebSocket door: history, reset and agent refuse over-long keys too.
    frames = [CONNECT, *(orjson.dumps({"type": "req", "id": method, "method": method, "params": {
        "sessionKey": "k" * 5000, "message": "hi"}}).decode()
        for method in ("chat.history", "sessions.reset", "agent"))]
    res = [f for f in gw.websocket(frames).frames if f["type"] == "res"][1:]
    assert [(f["id"], f["ok"], f["error"]["message"]) for f in res] == [
        (m, False, "`sessionKey` is longer than 512 characters.")
        for m in ("chat.history", "sessions.reset", "agent")]
    assert check_http(post(gw, chat("still up"))) == "200 json"


def _turns(gw: InProcess, key: str) -> list[Any]:
    assert gw.nc is not None
    tx = Transcripts(gw.nc.jetstream(timeout=10))
    return gw.call(tx.load(subjects.session_token(key)))[0]


@pytest.mark.slow
def test_distinct_users_never_share_a_session(gw: InProcess) -> None:
    """End to end through the bus: two ``user`` values that differ (after the
    documented trimming and lower-casing) never see each other's turns, whatever
    separators, wildcards, NULs or control characters tell them apart."""

    @settings(FUZZ, max_examples=60)
    @given(a=st.text(alphabet=st.sampled_from(NASTY + "aA"), min_size=1, max_size=8),
           b=st.text(alphabet=st.sampled_from(NASTY + "aA"), min_size=1, max_size=8))
    def prop(a: str, b: str) -> None:
        suffix = uuid.uuid4().hex[:6]  # shared: only a and b tell the two apart
        users = [f"{x}{suffix}" for x in (a, b)]
        keys = [f"agent:main:openai-user:{u.strip().lower()}" for u in users]
        assume(keys[0] != keys[1])
        for user in users:
            assert check_http(post(gw, chat(f"turn of {user!r}", user=user))) == "200 json"
        for user, key in zip(users, keys, strict=True):
            assert [t.user for t in _turns(gw, key)] == [f"turn of {user!r}"]

    prop()


# --------------------------------------------------------------------------- auth


def test_http_and_ws_share_auth_and_lockout(nats: NatsServer) -> None:
    """Wrong secrets over HTTP and over the WebSocket count against one lockout per
    client IP: after it, both doors refuse even the right secret (HTTP 429 with
    Retry-After, WS an error res then close 1008); loopback is never locked out."""
    def ws_connect(h: InProcess, token: str, ip: str) -> Any:
        frame = orjson.dumps({"type": "req", "id": "c", "method": "connect", "params": {
            "minProtocol": 3, "maxProtocol": 3, "auth": {"token": token}}}).decode()
        return h.websocket([frame], client=(ip, 1), settle=5)

    with InProcess(fuzz_config(), nats.url, worker=False) as h:
        bad = [(b"authorization", b"Bearer wrong")]
        assert post(h, chat("x"), bad, auth=False).status == 401
        refused = ws_connect(h, "wrong", "203.0.113.7")
        assert refused.close_code == 1008
        assert refused.frames[-1]["error"]["code"] == "unauthorized"
        assert post(h, chat("x"), bad, auth=False).status == 401  # third strike: locked
        locked = post(h, b"[]")
        assert locked.status == 429 and int(locked.headers["retry-after"]) > 100
        check_http(locked)
        ws_locked = ws_connect(h, TOKEN, "203.0.113.7")
        assert ws_locked.close_code == 1008
        assert ws_locked.frames[-1]["error"]["code"] == "rate_limited"
        # Another IP is unaffected; loopback is never counted.
        assert post(h, b"[]", client=("203.0.113.8", 1)).status == 400
        for _ in range(5):
            assert ws_connect(h, "wrong", "127.0.0.1").close_code == 1008
        assert ws_connect(h, TOKEN, "127.0.0.1").close_code is None
        assert h.logs.problems() == []


def test_success_resets_the_failure_count(nats: NatsServer) -> None:
    with InProcess(fuzz_config(), nats.url, worker=False) as h:
        bad = [(b"authorization", b"Bearer wrong")]
        for _ in range(5):  # 2 failures, 1 success: never 3 in a row
            assert post(h, chat("x"), bad, auth=False).status == 401
            assert post(h, chat("x"), bad, auth=False).status == 401
            assert post(h, b"[]").status == 400
        assert post(h, chat("x"), bad, auth=False).status == 401


def test_password_mode_over_http_and_ws(nats: NatsServer) -> None:
    config = fuzz_config()
    config["gateway"]["auth"] = {"mode": "password", "password": "s3cret pass"}
    with InProcess(config, nats.url, worker=False) as h:
        good = [(b"authorization", b"Bearer s3cret pass")]
        assert post(h, b"[]", good, auth=False).status == 400  # past auth
        assert post(h, b"[]", auth=True).status == 401  # the token is not the password
        frame = orjson.dumps({"type": "req", "id": "c", "method": "connect", "params": {
            "minProtocol": 3, "maxProtocol": 3, "auth": {"password": "s3cret pass"}}}).decode()
        hello = h.websocket([frame], client=("127.0.0.1", 1), settle=5)
        assert hello.close_code is None and hello.frames[-1]["payload"]["type"] == "hello-ok"


@pytest.mark.parametrize("presented", [
    "", "x", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "t" * 10_000, "\x00" * 40, "😀" * 20,
    TOKEN,
], ids=["empty", "short", "prefix", "extended", "upper", "long", "nul", "emoji", "right"])
def test_secret_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch,
                                            presented: str) -> None:
    """Whatever is presented, the comparison is ``hmac.compare_digest`` over two
    SHA-256 digests (equal length, independent of where the strings differ)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert auth_module.secrets_equal(presented, TOKEN) is (presented == TOKEN)
    assert calls == [(hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest(),
                      hashlib.sha256(TOKEN.encode()).digest())]

