"""``POST /v1/embeddings`` (SPEC §11) end to end.

- the official ``openai`` SDK, unchanged, against a running stack (two gateways,
  two workers, a fake OpenAI upstream with an embeddings route): one and many
  inputs, ``float`` and ``base64`` (the SDK's default, which it decodes itself),
  ``dimensions`` forwarded, the echo provider's vectors, ``x-openclaw-model``,
  a 2,048 × 1,536 result larger than a bus message, a request larger than one;
- the run failures mapped as chat's are (upstream 401/429/5xx, timeout,
  unreachable, a provider without embeddings, no worker);
- every check row in its order, in-process against a real NATS;
- a client that disconnects cancels the upstream call;
- the pieces: vectors on the wire, the final event, the config and the
  embedding model's resolution.

Every reply is checked against ``openai-schemas/embedding_response.strict.json``
(base64 replies once their vectors are decoded: the schema knows only numbers).
"""

from __future__ import annotations

import asyncio
import base64
import math
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import orjson
import pytest
from jsonschema import Draft202012Validator

from bus.messages import Embedded, Usage, decode_event, pack_vector, unpack_vector
from bus.payloads import PAYLOADS_BUCKET
from clawbus.config import ConfigError, parse_settings
from clawbus.natsserver import NatsServer
from gateway.embeddings import parse_embedding_request
from gateway.sequencer import Sequencer
from tests.fakes.openai_upstream import FakeOpenAI, fake_vector
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import SCHEMA_DIR, validate
from tests.test_chat_errors import assert_error, in_process
from tests.test_client_tools import _close_clients, tag  # noqa: F401 (a fixture)
from tests.test_client_tools import sdk as tool_sdk
from workers.providers.echo import echo_vector

AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "/v1/embeddings"
MODEL = "text-embedding-3-small"
SCHEMA = Draft202012Validator(
    orjson.loads((SCHEMA_DIR / "embedding_response.strict.json").read_bytes()))


def valid(reply: Any, *, values: int | None = None) -> Any:
    """``reply`` (a JSON body, or an SDK object) once checked against the schema;
    with ``values``, only that many values of each vector are (the schema checks
    each one in Python: seconds for millions)."""
    body = reply.model_dump(mode="json") if hasattr(reply, "model_dump") else reply
    if values is not None:
        body = {**body, "data": [{**item, "embedding": item["embedding"][:values]}
                                 for item in body["data"]]}
    SCHEMA.validate(body)
    return reply


def unpacked(text: str) -> list[float]:
    data = base64.b64decode(text)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def closed_port() -> int:
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def embeddings_config(up: FakeOpenAI | None, **bus: Any) -> dict[str, Any]:
    """Agents: ``main`` embeds on the fake, ``beta`` has no embedding model,
    ``offline`` embeds with echo, ``claude`` on an Anthropic provider."""
    config = base_config(up, **bus)
    base_url = up.base_url if up is not None else f"http://127.0.0.1:{closed_port()}/v1"
    providers = config["models"]["providers"]
    providers["claude"] = {"api": "anthropic-messages", "baseUrl": base_url, "apiKey": "k"}
    providers["slow"] = {"api": "openai-completions", "baseUrl": base_url,
                         "timeoutSeconds": 0.5}
    providers["dead"] = {"api": "openai-completions",
                         "baseUrl": f"http://127.0.0.1:{closed_port()}/v1"}
    if up is None:
        providers["fake"] = {"api": "openai-completions", "baseUrl": base_url}
    config["agents"]["list"] = [
        {"id": "main", "default": True, "embeddingModel": f"fake/{MODEL}"},
        {"id": "beta"},
        {"id": "offline", "embeddingModel": "echo/echo"},
        {"id": "claude", "embeddingModel": "claude/claude-embed"},
    ]
    return config


@pytest.fixture(scope="module")
def up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def estack(up: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack.start(tmp_path_factory.mktemp("embeddings"), up, embeddings_config(up),
                     gateways=2, workers=2)
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(autouse=True)
def _well_behaved(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts and ends with a well-behaved upstream."""
    fake: FakeOpenAI | None = request.getfixturevalue("up") \
        if "up" in request.fixturenames else None
    yield
    if fake is not None:
        fake.fail_status, fake.stall, fake.embedding_delay = None, False, 0.0


def sdk(url: str, **headers: str) -> openai.OpenAI:
    """The SDK client of tests/test_client_tools.py (closed after the test), with
    ``headers`` on every request."""
    client: openai.OpenAI = tool_sdk(url)
    return client.with_options(default_headers=headers) if headers else client


def upstream_embeddings(up: FakeOpenAI, text: str) -> list[dict[str, Any]]:
    """The bodies of the upstream's embeddings requests that held ``text``."""
    return [r.body for r in up.requests if r.path == "/v1/embeddings"
            and isinstance(r.body, dict) and text in orjson.dumps(r.body).decode()]


async def stored_payloads(bus_url: str) -> list[str]:
    """The objects left in the payloads bucket (large requests and replies)."""
    nc = await nats.connect(bus_url)
    try:
        store = await nc.jetstream().object_store(PAYLOADS_BUCKET)
        try:
            return [info.name for info in await store.list(ignore_deletes=True)]
        except nats.js.errors.NotFoundError:
            return []
    finally:
        await nc.close()


def no_payloads_left(st: Stack, prefix: str) -> None:
    """Every large request and reply was deleted once read (in the background)."""
    deadline = 50
    while [n for n in asyncio.run(stored_payloads(st.nats.url)) if n.startswith(prefix)]:
        deadline -= 1
        assert deadline, "payloads left behind"
        time.sleep(0.1)


def post(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    with httpx.Client(timeout=60) as http:
        return http.post(f"{url}{URL}", json=body, headers={**AUTH, **headers})


# ----------------------------------------------------------------------- the SDK


def test_one_input_float(estack: Stack) -> None:
    text = f"{tag()} hello world"
    reply = valid(sdk(estack.url).embeddings.create(model="openclaw", input=text,
                                                    encoding_format="float"))
    assert reply.object == "list"
    assert reply.model == "openclaw"
    (item,) = reply.data
    assert (item.object, item.index) == ("embedding", 0)
    assert item.embedding == fake_vector(MODEL, text, 32)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 3)
    (body,) = upstream_embeddings(estack.upstream, text)
    assert body == {"model": MODEL, "input": [text], "encoding_format": "base64"}


def test_many_inputs_float_and_base64_agree(estack: Stack) -> None:
    t = tag()
    texts = [f"{t} one", f"{t} two words", f"{t} three little words", "same", "same"]
    floats = valid(sdk(estack.url).embeddings.create(
        model="openclaw", input=texts, encoding_format="float"))
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    decoded = valid(sdk(estack.gateways[1].url).embeddings.create(model="openclaw",
                                                                  input=texts))
    expected = [fake_vector(MODEL, text, 32) for text in texts]
    assert [d.index for d in floats.data] == [0, 1, 2, 3, 4]
    assert [d.embedding for d in floats.data] == expected
    assert [d.embedding for d in decoded.data] == expected
    assert floats.usage.prompt_tokens == decoded.usage.prompt_tokens == 2 + 3 + 4 + 1 + 1


def test_explicit_base64_is_passed_on_as_text(estack: Stack) -> None:
    texts = [f"{tag()} a", f"{tag()} b"]
    raw = sdk(estack.url).embeddings.with_raw_response.create(
        model="openclaw", input=texts, encoding_format="base64")
    parsed = raw.parse()  # asked for explicitly: the SDK leaves the text as it is
    assert all(isinstance(d.embedding, str) for d in parsed.data)
    body = orjson.loads(raw.content)
    vectors = [unpacked(item["embedding"]) for item in body["data"]]
    assert vectors == [fake_vector(MODEL, t, 32) for t in texts]
    for item, vector in zip(body["data"], vectors, strict=True):
        item["embedding"] = vector
    valid(body)


def test_dimensions_are_forwarded(estack: Stack) -> None:
    text = f"{tag()} short"
    reply = valid(sdk(estack.url).embeddings.create(model="openclaw", input=[text],
                                                    dimensions=8, encoding_format="float"))
    assert reply.data[0].embedding == fake_vector(MODEL, text, 8)
    (body,) = upstream_embeddings(estack.upstream, text)
    assert body["dimensions"] == 8


def test_raw_json_reply(estack: Stack) -> None:
    resp = post(estack.url, {"model": "openclaw/main", "input": "raw", "user": "alice"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-content-type-options"] == "nosniff"
    body = valid(resp.json())
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["model"] == "openclaw/main"
    assert body["data"] == [{"object": "embedding", "index": 0,
                             "embedding": fake_vector(MODEL, "raw", 32)}]
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


def test_echo_vectors_are_deterministic_unit_vectors(estack: Stack) -> None:
    texts = ["hello", "hello", "another text"]
    first = valid(sdk(estack.url).embeddings.create(model="openclaw/offline", input=texts,
                                                    encoding_format="float"))
    again = valid(sdk(estack.gateways[1].url).embeddings.create(model="openclaw/offline",
                                                                input=texts))
    vectors = [d.embedding for d in first.data]
    assert [d.embedding for d in again.data] == vectors
    assert all(len(v) == 64 for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]
    for vector in vectors:
        assert math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-6)
        # float32 on the bus: the worker's values, to float32 precision
    assert vectors[2] == pytest.approx(echo_vector("another text", 64), abs=1e-7)
    assert first.usage.prompt_tokens == 4
    sized = valid(sdk(estack.url).embeddings.create(model="openclaw/offline", input="hello",
                                                    dimensions=10))
    assert len(sized.data[0].embedding) == 10
    assert math.isclose(math.hypot(*sized.data[0].embedding), 1.0, rel_tol=1e-6)


def test_model_header(estack: Stack) -> None:
    t = tag()
    # provider/model: echo for an agent that embeds on the fake
    echo = valid(sdk(estack.url, **{"x-openclaw-model": "echo/any"}).embeddings.create(
        model="openclaw", input=f"{t} x"))
    assert len(echo.data[0].embedding) == 64
    assert echo.model == "openclaw"
    # a bare model id: on the provider of the agent's embedding model
    bare = valid(sdk(estack.url, **{"x-openclaw-model": "text-embedding-3-large"})
                 .embeddings.create(model="openclaw", input=f"{t} y", encoding_format="float"))
    assert bare.data[0].embedding == fake_vector("text-embedding-3-large", f"{t} y", 32)
    (body,) = upstream_embeddings(estack.upstream, f"{t} y")
    assert body["model"] == "text-embedding-3-large"
    # an agent without an embedding model embeds with the header's
    beta = valid(sdk(estack.url, **{"x-openclaw-model": "fake/other"}).embeddings.create(
        model="openclaw/beta", input=f"{t} z", encoding_format="float"))
    assert beta.data[0].embedding == fake_vector("other", f"{t} z", 32)


def test_large_result_goes_through_the_payloads_bucket(estack: Stack) -> None:
    """2,048 vectors of 1,536 values: 12 MB of float32, far over a bus message."""
    texts = [f"input {i}" for i in range(2048)]
    reply = valid(sdk(estack.url).embeddings.create(model="openclaw/offline", input=texts,
                                                    dimensions=1536), values=8)
    assert len(reply.data) == 2048
    assert [d.index for d in reply.data] == list(range(2048))
    assert all(len(d.embedding) == 1536 for d in reply.data)
    for i in (0, 1000, 2047):
        assert reply.data[i].embedding == pytest.approx(echo_vector(texts[i], 1536), abs=1e-7)
    no_payloads_left(estack, "embeddings-")


def test_large_request_and_result_from_the_upstream(estack: Stack) -> None:
    """A request over a bus message (1.6 MB of text) and a large float reply."""
    t = tag()
    texts = [f"{t} {i} " + "lorem ipsum " * 64 for i in range(2048)]
    reply = valid(sdk(estack.url).embeddings.create(model="openclaw", input=texts,
                                                    dimensions=256, encoding_format="float"),
                  values=8)
    assert len(reply.data) == 2048
    assert reply.data[2047].embedding == fake_vector(MODEL, texts[2047], 256)
    assert reply.usage.prompt_tokens == sum(len(text.split()) for text in texts)
    no_payloads_left(estack, "")


# ----------------------------------------------------------------------- run failures


def test_provider_without_embeddings_is_a_clean_error(estack: Stack) -> None:
    resp = post(estack.url, {"model": "openclaw/claude", "input": "hi"})
    assert resp.status_code == 500, resp.text
    validate("error_response", resp.json())
    assert resp.json()["error"] == {
        "message": "upstream provider failed: anthropic-messages has no embeddings API",
        "type": "api_error", "param": None, "code": "failed"}


@pytest.mark.parametrize(("setup", "status", "type_", "message"), [
    ({"fail_status": 401}, 500, "authentication_error",
     "upstream provider rejected the credentials: upstream returned HTTP 401: "
     "Incorrect API key provided."),
    ({"fail_status": 429}, 429, "rate_limit_error", "upstream provider rate limit exceeded"),
    ({"fail_status": 500}, 500, "api_error",
     "upstream provider failed: upstream returned HTTP 500: "
     "The server had an error processing your request."),
    ({"fail_status": 503}, 500, "api_error",
     "upstream provider failed: upstream returned HTTP 503: "
     "The server had an error processing your request."),
])
def test_upstream_failures_map_like_chat(estack: Stack, setup: dict[str, Any], status: int,
                                         type_: str, message: str) -> None:
    for key, value in setup.items():
        setattr(estack.upstream, key, value)
    resp = post(estack.url, {"model": "openclaw", "input": "hi"})
    assert resp.status_code == status, resp.text
    validate("error_response", resp.json())
    assert (resp.json()["error"]["type"], resp.json()["error"]["message"]) == (type_, message)
    if status == 429:
        assert resp.headers["retry-after"] == "1"
    with pytest.raises(openai.APIStatusError) as err:
        sdk(estack.url).embeddings.create(model="openclaw", input="hi")
    assert err.value.status_code == status


def test_upstream_timeout_and_unreachable(estack: Stack) -> None:
    estack.upstream.stall = True
    slow = post(estack.url, {"input": "hi"}, **{"x-openclaw-model": "slow/m"})
    estack.upstream.stall = False
    dead = post(estack.url, {"input": "hi"}, **{"x-openclaw-model": "dead/m"})
    assert slow.status_code == 504, slow.text
    assert slow.json()["error"]["message"] == "upstream provider timeout"
    assert dead.status_code == 502, dead.text
    assert dead.json()["error"] == {"message": "upstream provider error", "type": "api_error",
                                    "param": None, "code": "unreachable"}


def test_client_disconnect_cancels_the_upstream_call(estack: Stack) -> None:
    up = estack.upstream
    up.embedding_delay = 30.0
    text = f"{tag()} abandoned"
    with httpx.Client(timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{estack.url}{URL}", json={"input": text}, headers=AUTH)
    up.wait_for(lambda records: any(r.disconnected and text in orjson.dumps(r.body).decode()
                                    for r in records if r.path == URL), timeout=5.0)


# ----------------------------------------------------------------------- check rows


@pytest.fixture
def cfg() -> dict[str, Any]:
    config = embeddings_config(None, queueTimeoutSeconds=0.5)
    config["gateway"]["auth"]["rateLimit"] = {"maxAttempts": 3, "windowSeconds": 60,
                                              "lockoutSeconds": 120}
    config["gateway"]["http"]["endpoints"]["chatCompletions"]["maxBodyBytes"] = 4096
    return config


BAD_REQUEST = "invalid_request_error"
INVALID_MODEL = "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."
INPUT_INVALID = "`input` must be a string or an array of 1 to 2048 strings."
INPUT_TOKENS = "`input` as tokens (arrays of integers) is not supported: send text."


@pytest.mark.parametrize(("body", "headers", "message"), [
    ({"model": "gpt-4", "input": 5}, {}, INVALID_MODEL),
    ({"model": 7, "input": "x"}, {}, INVALID_MODEL),
    ({"model": "openclaw/nobody", "input": 5}, {}, "Unknown agent 'nobody'."),
    ({"input": "x"}, {"x-openclaw-agent-id": "nobody"}, "Unknown agent 'nobody'."),
    ({"input": 5}, {"x-openclaw-model": "nope/m"}, "Unknown model provider 'nope'."),
    ({"model": "openclaw/beta", "input": 5}, {}, "Agent 'beta' has no embedding model."),
    ({"input": "x"}, {"x-openclaw-agent": "beta"}, "Agent 'beta' has no embedding model."),
    ({"input": 5, "encoding_format": "hex"}, {},
     "`encoding_format` must be `float` or `base64`."),
    ({"input": "x", "encoding_format": 1}, {},
     "`encoding_format` must be `float` or `base64`."),
    ({"input": 5, "dimensions": 0}, {}, "`dimensions` must be a positive integer."),
    ({"input": "x", "dimensions": -3}, {}, "`dimensions` must be a positive integer."),
    ({"input": "x", "dimensions": 1.5}, {}, "`dimensions` must be a positive integer."),
    ({"input": "x", "dimensions": "8"}, {}, "`dimensions` must be a positive integer."),
    ({"input": "x", "dimensions": True}, {}, "`dimensions` must be a positive integer."),
    ({"input": 5, "user": 5}, {}, "`user` must be a string."),
    ({}, {}, INPUT_INVALID),
    ({"input": None}, {}, INPUT_INVALID),
    ({"input": 5}, {}, INPUT_INVALID),
    ({"input": {"text": "x"}}, {}, INPUT_INVALID),
    ({"input": []}, {}, INPUT_INVALID),
    ({"input": ["x"] * 2049}, {}, INPUT_INVALID),
    ({"input": ""}, {}, "`input` must not be an empty string."),
    ({"input": [1, 2, 3]}, {}, INPUT_TOKENS),
    ({"input": [[1, 2], [3]]}, {}, INPUT_TOKENS),
    ({"input": ["a", ""]}, {}, "`input[1]` must not be an empty string."),
    ({"input": ["a", 3]}, {}, "`input[1]` must be a string."),
    ({"input": ["a", ["b"]]}, {}, "`input[1]` must be a string."),
    ({"input": [True]}, {}, "`input[0]` must be a string."),
], ids=lambda value: orjson.dumps(value).decode()[:40] if isinstance(value, dict) else None)
async def test_request_rows(shared_nats: NatsServer, cfg: dict[str, Any],
                            body: dict[str, Any], headers: dict[str, str],
                            message: str) -> None:
    cfg["gateway"]["http"]["endpoints"]["chatCompletions"]["maxBodyBytes"] = 1 << 20
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=body, headers={**AUTH, **headers})
    assert_error(resp, 400, message, BAD_REQUEST)


async def test_http_rows_in_order(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        get = await http.get(URL, headers=AUTH)
        unauthorized = await http.post(URL, json={"input": "x"})
        wrong = [await http.post(URL, json={"input": "x"},
                                 headers={"Authorization": "Bearer wrong"}) for _ in range(3)]
        locked = await http.post(URL, json={"input": "x"}, headers=AUTH)
    assert_error(get, 405, "Method Not Allowed", BAD_REQUEST)
    assert get.headers["allow"] == "POST"
    assert_error(unauthorized, 401, "Unauthorized", "unauthorized")
    assert_error(wrong[0], 401, "Unauthorized", "unauthorized")
    assert_error(locked, 429, "Too many failed authentication attempts. Please try again later.",
                 "rate_limited")
    assert int(locked.headers["retry-after"]) > 0
    async with in_process(cfg, shared_nats.url) as http:
        large = await http.post(URL, content=b'{"input": "' + b"x" * 5000 + b'"}',
                                headers=AUTH)
        not_json = await http.post(URL, content=b"{not json", headers=AUTH)
        not_object = await http.post(URL, json=["x"], headers=AUTH)
        empty = await http.post(URL, content=b"", headers=AUTH)
    assert_error(large, 413, "Payload too large", BAD_REQUEST)
    assert not_json.status_code == 400 and not_json.json()["error"]["message"].startswith(
        "Invalid JSON body")
    assert_error(not_object, 400, "Request body must be a JSON object.", BAD_REQUEST)
    assert_error(empty, 400, INPUT_INVALID, BAD_REQUEST)


async def test_disabled_is_plain_404(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    cfg["gateway"]["http"]["endpoints"]["chatCompletions"]["enabled"] = False
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json={"input": "x"}, headers=AUTH)
    assert resp.status_code == 404
    assert resp.text == "Not Found"
    assert resp.headers["content-type"].startswith("text/plain")


async def test_served_when_only_responses_are(shared_nats: NatsServer,
                                              cfg: dict[str, Any]) -> None:
    cfg["gateway"]["http"]["endpoints"] = {"responses": {"enabled": True}}
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json={"model": "openclaw/beta", "input": "x"}, headers=AUTH)
    assert_error(resp, 400, "Agent 'beta' has no embedding model.", BAD_REQUEST)


async def test_no_worker_is_503(tmp_path: Path, cfg: dict[str, Any]) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as nats:
        async with in_process(cfg, nats.url) as http:
            resp = await http.post(URL, json={"input": "x"}, headers=AUTH)
    assert_error(resp, 503, "No agent worker available.", "api_error")


# ----------------------------------------------------------------------- pieces


def test_vectors_on_the_wire() -> None:
    vector = [0.5, -0.25, 1e-3, 3.0]
    packed = pack_vector(vector)
    assert base64.b64decode(packed) == struct.pack("<4f", *vector)
    assert unpack_vector(packed) == pytest.approx(vector, rel=1e-7)
    event = Embedded(seq=1, attempt=1, vectors=(packed,), usage=Usage(prompt_tokens=2))
    assert decode_event(event.model_dump_json().encode()) == event


def test_embedded_ends_a_run() -> None:
    event = Embedded(seq=1, attempt=1, vectors=(pack_vector([1.0]),))
    sequencer = Sequencer()
    shown = sequencer.feed(event)
    assert [e.type for e in shown] == ["accepted", "embedded"]
    assert sequencer.ended and not sequencer.streamed
    # after a lost event, the final one still ends it, whole
    gap = Sequencer()
    assert gap.feed(Embedded(seq=3, attempt=1, vectors=event.vectors))[-1].type == "embedded"
    assert gap.ended


@pytest.mark.parametrize(("agents", "problem"), [
    ({"defaults": {"embeddingModel": "nope/x"}},
     "agents.defaults.embeddingModel: model 'nope/x' names unknown provider 'nope'"),
    ({"defaults": {"embeddingModel": "text-embedding-3-small"}},
     "agents.defaults.embeddingModel: model 'text-embedding-3-small' must look like"),
    ({"list": [{"id": "main", "embeddingModel": "nope/x"}]},
     "agent 'main' embeddingModel: model 'nope/x' names unknown provider 'nope'"),
    ({"list": [{"id": "main", "embeddingModel": 5}]}, "agents.list[0].embeddingModel"),
])
def test_embedding_model_config_is_checked(agents: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"agents": agents}, env={})
    assert problem in str(info.value)


def test_embedding_model_resolution() -> None:
    settings = parse_settings({
        "agents": {"defaults": {"embeddingModel": "echo/default-embed"},
                   "list": [{"id": "main"}, {"id": "own", "model": "fake/chat",
                                             "embeddingModel": "other/own-embed"}]},
        "models": {"providers": {"fake": {"api": "openai-completions"},
                                 "other": {"api": "openai-completions"}}}}, env={})

    def resolved(model: str, **headers: str) -> str:
        return parse_embedding_request({"model": model, "input": "x"}, headers,
                                       settings).embedding_model

    assert resolved("openclaw") == "echo/default-embed"
    assert resolved("openclaw/own") == "other/own-embed"
    assert resolved("openclaw/own", **{"x-openclaw-model": "fake/e"}) == "fake/e"
    assert resolved("openclaw/own", **{"x-openclaw-model": " bare "}) == "other/bare"
    assert resolved("agent:own", **{"x-openclaw-model": "bare"}) == "other/bare"
    settings = settings.model_copy(update={"agents": settings.agents.model_copy(
        update={"defaults": settings.agents.defaults.model_copy(
            update={"embedding_model": None})})})
    # no embedding model of its own: a bare id goes on its chat model's provider
    assert resolved("openclaw", **{"x-openclaw-model": "bare"}) == "echo/bare"
