"""Real client libraries against a running stack (two gateways, three workers, a fake
OpenAI upstream), each used unchanged: only the base URL and the key are set.

- the official ``openai`` Node SDK, installed from npm into a per-session temp dir
  (skipped only when npm cannot reach its registry);
- LangChain's ``ChatOpenAI`` (``langchain-openai``);
- an Open WebUI-style conversation over plain HTTP: list models, then streamed
  turns with ``user`` set and the whole history resent each turn.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from tests.fakes.openai_upstream import FakeOpenAI, RequestRecord
from tests.helpers import TOKEN, Stack

# npm failures that mean "no registry here" (offline machine, proxy, DNS), not a bug.
NPM_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
               "ENETUNREACH", "EHOSTUNREACH", "ERR_SOCKET_TIMEOUT", "network request")
# Override to try another release, e.g. CLAWBUS_TEST_OPENAI_NODE=openai@4
OPENAI_NODE_ENV = "CLAWBUS_TEST_OPENAI_NODE"


def tag() -> str:
    return uuid.uuid4().hex[:10]


def records_with(up: FakeOpenAI, text: str) -> list[RequestRecord]:
    return [r for r in up.requests if text in orjson.dumps(r.body).decode()]


# --------------------------------------------------------------------------- openai (Node)


def _node_major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return int(out.strip().lstrip("v").split(".")[0])


@pytest.fixture(scope="session")
def openai_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the official ``openai`` npm package installed, once per session."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the openai Node SDK test")
    # openai 7.x needs Node >= 22; 6.x is the newest major that supports Node 20.
    spec = os.environ.get(OPENAI_NODE_ENV) or (
        "openai@latest" if _node_major(node) >= 22 else "openai@6")
    directory = tmp_path_factory.mktemp("openai-node")
    (directory / "package.json").write_text(
        json.dumps({"name": "clawbus-client-test", "private": True, "type": "module"}))
    try:
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-progress", "--loglevel=error",
             spec], cwd=directory, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install {spec} did not finish in 300 s (registry unreachable?)")
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(code in output for code in NPM_OFFLINE):
            pytest.skip(f"npm cannot reach its registry to install {spec}: "
                        f"{output.strip().splitlines()[-1] if output.strip() else ''}")
        pytest.fail(f"npm install {spec} failed:\n{output}")
    (directory / "client.mjs").write_text(NODE_CLIENT)
    return directory


NODE_CLIENT = r"""
// The official openai SDK, used as documented: only baseURL and apiKey set.
import OpenAI from "openai";

const [baseURL, apiKey, tag] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const out = { version: OpenAI.VERSION ?? null };

const completion = await client.chat.completions.create({
  model: "openclaw",
  messages: [{ role: "user", content: `node ${tag}` }],
});
out.completion = {
  id: completion.id,
  object: completion.object,
  model: completion.model,
  content: completion.choices[0].message.content,
  role: completion.choices[0].message.role,
  finish_reason: completion.choices[0].finish_reason,
  usage: completion.usage,
};

const stream = await client.chat.completions.create({
  model: "openclaw/beta",
  stream: true,
  stream_options: { include_usage: true },
  messages: [
    { role: "system", content: "Be brief." },
    { role: "user", content: `streamed node ${tag}` },
  ],
});
const deltas = [];
const ids = new Set();
let role = null, finish = null, usage = null;
for await (const chunk of stream) {
  ids.add(chunk.id);
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    if (choice.delta?.role) role = choice.delta.role;
    if (choice.delta?.content) deltas.push(choice.delta.content);
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
out.stream = { text: deltas.join(""), role, finish_reason: finish, usage, ids: [...ids] };

out.models = [];
for await (const model of client.models.list()) out.models.push(model.id);
out.model = await client.models.retrieve("openclaw/beta");

try {
  await client.chat.completions.create({
    model: "openclaw/nope", messages: [{ role: "user", content: "hi" }],
  });
  out.unknown_agent = null;
} catch (err) {
  out.unknown_agent = { status: err.status, class: err.constructor.name, message: err.message };
}
try {
  await new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).models.list();
  out.bad_key = null;
} catch (err) {
  out.bad_key = { status: err.status, class: err.constructor.name };
}

console.log(JSON.stringify(out));
"""


@pytest.mark.timeout(360)
def test_openai_node_sdk(stack: Stack, openai_node: Path) -> None:
    t = tag()
    url = stack.gateways[0].url
    proc = subprocess.run(["node", "client.mjs", f"{url}/v1", TOKEN, t], cwd=openai_node,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])

    completion = out["completion"]
    assert completion["id"].startswith("chatcmpl_")
    assert completion["object"] == "chat.completion" and completion["model"] == "openclaw"
    assert (completion["role"], completion["content"]) == ("assistant", f"echo: node {t}")
    assert completion["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 3
    assert completion["usage"]["total_tokens"] == (completion["usage"]["prompt_tokens"]
                                                   + completion["usage"]["completion_tokens"])

    stream = out["stream"]
    assert stream["text"] == f"echo: streamed node {t}"
    assert (stream["role"], stream["finish_reason"]) == ("assistant", "stop")
    assert stream["usage"]["completion_tokens"] == 4
    assert len(stream["ids"]) == 1 and stream["ids"][0].startswith("chatcmpl_")
    (rec,) = records_with(stack.upstream, f"streamed node {t}")
    assert rec.body["messages"][0] == {"role": "system", "content": "You are beta.\n\nBe brief."}

    assert out["models"] == ["openclaw", "openclaw/default", "openclaw/main", "openclaw/beta"]
    assert out["model"] == {"id": "openclaw/beta", "object": "model", "created": 0,
                            "owned_by": "openclaw"}
    assert out["unknown_agent"]["status"] == 400
    assert out["unknown_agent"]["class"] == "BadRequestError"
    assert "Unknown agent 'nope'." in out["unknown_agent"]["message"]
    assert out["bad_key"] == {"status": 401, "class": "AuthenticationError"}


# --------------------------------------------------------------------------- LangChain


def chat_model(url: str, model: str = "openclaw") -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{url}/v1", api_key=TOKEN, model=model, max_retries=0,
                      timeout=30)


def test_langchain_invoke(stack: Stack) -> None:
    t = tag()
    reply = chat_model(stack.gateways[1].url).invoke(f"langchain {t}")
    assert reply.content == f"echo: langchain {t}"
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 3


def test_langchain_stream_with_system_message(stack: Stack) -> None:
    t = tag()
    llm = chat_model(stack.gateways[1].url, "openclaw/beta")
    chunks = list(llm.stream([SystemMessage("Answer in one line."),
                              HumanMessage(f"langchain stream {t}")]))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == f"echo: langchain stream {t}"
    (rec,) = records_with(stack.upstream, f"langchain stream {t}")
    assert rec.body["messages"][0] == {
        "role": "system", "content": "You are beta.\n\nAnswer in one line."}
    assert rec.body["stream"] is True


async def test_langchain_async(stack: Stack) -> None:
    t = tag()
    llm = chat_model(stack.gateways[0].url)
    reply = await llm.ainvoke(f"async {t}")
    assert reply.content == f"echo: async {t}"
    text = "".join([str(c.content) async for c in llm.astream(f"astream {t}")])
    assert text == f"echo: astream {t}"


# --------------------------------------------------------------------------- Open WebUI


def sse_chunks(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """The JSON ``data:`` frames of an SSE response, and whether ``[DONE]`` ended it."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, `: keep-alive` comments
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        chunks.append(json.loads(data))
    return chunks, done


def streamed_turn(http: httpx.Client, url: str, body: dict[str, Any]) -> str:
    with http.stream("POST", f"{url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks, done = sse_chunks(response)
    assert done
    assert "error" not in json.dumps(chunks)
    role = chunks[0]["choices"][0]["delta"]
    assert role["role"] == "assistant" and not role.get("content")
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_open_webui_style_conversation(stack: Stack) -> None:
    """What Open WebUI does with an "OpenAI API" connection: fetch the model list, then
    stream each turn with the whole conversation and the user's id, plus its own headers.
    Each turn goes to another gateway, as behind a load balancer."""
    t = tag()
    user = f"Alice-{t}"  # user ids are case-insensitive session keys
    headers = {"Authorization": f"Bearer {TOKEN}", "X-OpenWebUI-User-Name": "Alice",
               "X-OpenWebUI-User-Id": user, "X-OpenWebUI-Chat-Id": str(uuid.uuid4())}
    urls = [f"{gw.url}/v1" for gw in stack.gateways]
    with httpx.Client(headers=headers, timeout=30) as http:
        models = http.get(f"{urls[0]}/models")
        assert models.status_code == 200
        ids = [m["id"] for m in models.json()["data"]]
        assert "openclaw/main" in ids
        model = "openclaw/main"

        first = f"What is NATS? {t}"
        history: list[dict[str, Any]] = [{"role": "user", "content": first}]
        body: dict[str, Any] = {"model": model, "stream": True, "messages": history,
                                "user": user, "stream_options": {"include_usage": True},
                                "temperature": 0.7}
        answer = streamed_turn(http, urls[0], body)
        assert answer == f"echo: {first}"

        second = f"And JetStream? {t}"
        history += [{"role": "assistant", "content": answer},
                    {"role": "user", "content": second}]
        body = {**body, "messages": history, "user": user.lower()}
        answer2 = streamed_turn(http, urls[1], body)

    # The second turn continued the session: the first turn comes from the transcript,
    # and the resent history is flattened into the current message (SPEC §2).
    context = ("[Chat messages since your last reply - for context]\n"
               f"User: {first}\nAssistant: echo: {first}\n\n"
               "[Current message - respond to this]\n"
               f"User: {second}")
    assert answer2 == f"echo: {context}"
    (rec,) = [r for r in records_with(stack.upstream, second) if r.body.get("stream")]
    assert rec.body["messages"] == [
        {"role": "system", "content": "You are main."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": f"echo: {first}"},
        {"role": "user", "content": context},
    ]
    assert rec.body["temperature"] == 0.7
