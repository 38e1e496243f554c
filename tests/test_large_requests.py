"""Images and large requests end to end (SPEC §8, §12), against a running stack of
two gateways and two workers on a NATS whose messages carry at most 1 MiB:

- an image sent as a data URI reaches the fake upstream byte for byte, and the
  session transcript keeps only its placeholder;
- a 5 MB image request and a 1.5 MB text request (stateless and in a session,
  continued through the other gateway) succeed: their run requests travel
  through the payloads bucket, which is empty again once the runs end;
- a request over ``maxBodyBytes`` still gets 413;
- image errors are 400s naming the part;
- ``x-openclaw-model`` picks the upstream model.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import openai
import orjson
import pytest

from bus.payloads import PAYLOADS_BUCKET, TURNS_BUCKET
from tests.fakes.http_upstream import text_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import validate

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def size_reply(body: dict[str, Any]) -> str:
    """How much the last user message held: text characters and image bytes."""
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content")
    images = [p["image_url"]["url"] for p in content
              if isinstance(p, dict) and p.get("type") == "image_url"] \
        if isinstance(content, list) else []
    sizes = [len(base64.b64decode(url.split(",", 1)[1])) for url in images]
    return f"text {len(text_of(content))} images {sizes}"


@pytest.fixture(scope="module")
def big_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=size_reply) as up:
        yield up


@pytest.fixture(scope="module")
def lstack(big_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = base_config(big_upstream)
    config["models"]["providers"]["other"] = {"api": "openai-completions",
                                             "baseUrl": big_upstream.base_url}
    st = Stack.start(tmp_path_factory.mktemp("large"), big_upstream, config,
                     gateways=2, workers=2)
    try:
        yield st
    finally:
        st.stop()


def png(size: int) -> bytes:
    """A PNG-signed blob of ``size`` bytes (the gateway checks the MIME type it is
    declared with, not the pixels)."""
    return PNG_HEADER + os.urandom(size - len(PNG_HEADER))


def data_uri(blob: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(blob).decode()}"


def post(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", **headers})


def image_message(text: str, *blobs: bytes) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": data_uri(b)}}
                                          for b in blobs)]}


def upstream_images(up: FakeOpenAI, text: str) -> list[bytes]:
    (record,) = [r for r in up.requests
                 if isinstance(r.body, dict) and text in orjson.dumps(r.body).decode()]
    content = record.body["messages"][-1]["content"]
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
            for p in content if p.get("type") == "image_url"]


def no_payloads_left(url: str) -> None:
    """The payloads bucket empties once the runs end (deleted in the background
    right after the response: polled until then)."""
    async def empty() -> None:
        left = await bucket_objects(url, PAYLOADS_BUCKET)
        deadline = asyncio.get_running_loop().time() + 10
        while left and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            left = await bucket_objects(url, PAYLOADS_BUCKET)
        assert left == []
    asyncio.run(empty())


async def bucket_objects(url: str, bucket: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        store = await nc.jetstream().object_store(bucket)
        try:
            return [info.name for info in await store.list(ignore_deletes=True) if info.name]
        except Exception as exc:  # nats-py raises NotFoundError for an empty bucket
            if "not found" in str(exc).lower() or type(exc).__name__ == "NotFoundError":
                return []
            raise
    finally:
        await nc.close()


def test_data_uri_image_reaches_upstream_intact(lstack: Stack) -> None:
    t = uuid.uuid4().hex[:10]
    blob = png(180_000)
    response = post(lstack.url, {"model": "openclaw", "user": f"img-{t}",
                                 "messages": [image_message(f"[{t}] what is this?", blob)]})
    assert response.status_code == 200, response.text
    validate("chat_completion", response.json())
    assert response.json()["choices"][0]["message"]["content"] == \
        f"text {len(f'[{t}] what is this?')} images [180000]"
    assert upstream_images(lstack.upstream, t) == [blob]
    # The transcript keeps a placeholder, never the bytes; the next turn's
    # history shows it (through the other gateway).
    response = post(lstack.gateways[1].url, {"model": "openclaw", "user": f"img-{t}",
                                             "messages": [{"role": "user", "content": "again"}]})
    assert response.status_code == 200, response.text
    (record,) = [r for r in lstack.upstream.requests if isinstance(r.body, dict)
                 and any(m.get("content") == "again" for m in r.body["messages"])
                 and f"[{t}]" in orjson.dumps(r.body).decode()]
    earlier = record.body["messages"][-3]
    assert earlier["role"] == "user"
    assert text_of(earlier["content"]) == f"[{t}] what is this?\n[image: image/png, 176 KB]"


def test_five_megabyte_image_request(lstack: Stack) -> None:
    t = uuid.uuid4().hex[:10]
    blob = png(5 * 1024 * 1024)
    response = post(lstack.url, {"model": "openclaw",
                                 "messages": [image_message(f"[{t}] big", blob)]})
    assert response.status_code == 200, response.text
    assert upstream_images(lstack.upstream, t) == [blob]
    no_payloads_left(lstack.nats.url)


@pytest.mark.parametrize("stream", [False, True])
def test_one_and_a_half_megabyte_text_in_a_session(lstack: Stack, stream: bool) -> None:
    t = uuid.uuid4().hex[:10]
    text = f"[{t}] " + "lorem ipsum " * (1_500_000 // 12)
    client = openai.OpenAI(base_url=f"{lstack.url}/v1", api_key=TOKEN, max_retries=0,
                           timeout=60)
    if stream:
        chunks = list(client.chat.completions.create(
            model="openclaw", user=f"big-{t}", stream=True,
            messages=[{"role": "user", "content": text}]))
        reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(
            model="openclaw", user=f"big-{t}",
            messages=[{"role": "user", "content": text}]).choices[0].message.content or ""
    assert reply == f"text {len(text.strip())} images []"
    # The session continues through the other gateway, and its history holds the
    # whole 1.5 MB turn (stored as an object: it does not fit a bus message).
    other = openai.OpenAI(base_url=f"{lstack.gateways[1].url}/v1", api_key=TOKEN,
                          max_retries=0, timeout=60)
    history = asyncio.run(_history(lstack, f"agent:main:openai-user:big-{t}"))
    assert [m["content"] for m in history][:1] == [text.strip()]
    other.chat.completions.create(model="openclaw", user=f"big-{t}",
                                  messages=[{"role": "user", "content": "ok"}])
    no_payloads_left(lstack.nats.url)
    assert any(name.startswith("turn-") for name in
               asyncio.run(bucket_objects(lstack.nats.url, TURNS_BUCKET)))


async def _history(lstack: Stack, key: str) -> list[dict[str, Any]]:
    from gateway.sessions import Sessions
    nc = await nats.connect(lstack.nats.url)
    try:
        return await Sessions(nc.jetstream(), nc).history(key)
    finally:
        await nc.close()


def test_over_max_body_bytes_is_still_413(lstack: Stack) -> None:
    body = b'{"model":"openclaw","messages":[{"role":"user","content":"' + \
        b"x" * (20 * 1024 * 1024) + b'"}]}'
    response = httpx.post(f"{lstack.url}/v1/chat/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "Payload too large"


@pytest.mark.parametrize(("content", "message"), [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
     "`messages[0].content[0]`: bad data URI"),
    ([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}],
     "`messages[0].content[0]`: image type 'image/bmp' is not allowed"),
    ([{"type": "text", "text": "hi"},
      {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
     "`messages[0].content[1]`: image URL fetching is disabled"),
    ([{"type": "image_url", "image_url": {"url": data_uri(b"x" * 10)}}] * 9,
     "`messages[0].content[8]`: too many images"),
])
def test_image_errors_name_the_part(lstack: Stack, content: list[Any], message: str) -> None:
    response = post(lstack.url, {"model": "openclaw",
                                 "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400, response.text
    validate("error_response", response.json())
    assert response.json()["error"]["message"].startswith(message)
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("header", "model"), [
    ("other/gpt-special", "gpt-special"),  # provider/model
    ("gpt-bare", "gpt-bare"),  # a model id on the agent's own provider (fake)
])
def test_x_openclaw_model(lstack: Stack, header: str, model: str) -> None:
    t = uuid.uuid4().hex[:10]
    response = post(lstack.url, {"model": "openclaw",
                                 "messages": [{"role": "user", "content": f"[{t}] hi"}]},
                    **{"x-openclaw-model": header})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "openclaw"  # the request's model is echoed
    (record,) = [r for r in lstack.upstream.requests
                 if isinstance(r.body, dict) and t in orjson.dumps(r.body).decode()]
    assert record.body["model"] == model
    # "other" has no API key configured; "fake" sends its own.
    assert ("authorization" in record.headers) == header.startswith("gpt-bare")


def test_x_openclaw_model_unknown_provider(lstack: Stack) -> None:
    response = post(lstack.url, {"model": "openclaw",
                                 "messages": [{"role": "user", "content": "hi"}]},
                    **{"x-openclaw-model": "nope/gpt"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Unknown model provider 'nope'."


def test_payload_digest_is_checked_end_to_end(lstack: Stack) -> None:
    """Two different large images in one request arrive in order and intact."""
    t = uuid.uuid4().hex[:10]
    blobs = [png(900_000), png(700_000)]
    response = post(lstack.url, {"model": "openclaw",
                                 "messages": [image_message(f"[{t}] two", *blobs)]})
    assert response.status_code == 200, response.text
    got = upstream_images(lstack.upstream, t)
    assert [hashlib.sha256(b).hexdigest() for b in got] == \
        [hashlib.sha256(b).hexdigest() for b in blobs]
