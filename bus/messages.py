"""Wire messages between gateways and workers.

Pure data: pydantic models and nothing that touches NATS, HTTP or a provider.
Every message has a ``type`` discriminator and a version ``v``; unknown fields are
rejected so a mismatched peer fails loudly instead of dropping data.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_VERSION = 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = WIRE_VERSION


class SamplingParams(BaseModel):
    """The OpenAI sampling parameters clawbus forwards to providers (SPEC §2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def size_label(size: int) -> str:
    """``182 KB``, ``1.4 MB``, ``512 B``: an image's size in its transcript placeholder."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


class ImagePart(_Part):
    """An image of the run's input, as the model gets it: ``data`` is the base64
    of the bytes (from a data URI, or fetched by the gateway), ``size`` their
    decoded length. Transcripts keep only :meth:`placeholder`."""

    mime: str
    data: str
    size: int
    detail: str | None = None

    def placeholder(self) -> str:
        return f"[image: {self.mime}, {size_label(self.size)}]"


class ToolCall(_Part):
    """A function call the model asked for (``arguments``: a JSON text, as OpenAI)."""

    id: str
    name: str
    arguments: str = ""


class ChatItem(_Part):
    """One structured message of a conversation: user text (and images), an
    assistant reply (text and/or tool calls) or a tool result (``tool_call_id``,
    ``name`` when known, ``text``). Tool traffic stays in this shape from the
    client's request to the provider and in the transcript: never flattened."""

    role: Literal["user", "assistant", "tool"]
    text: str = ""
    images: tuple[ImagePart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def size(self) -> int:
        """Characters it costs against a history budget."""
        return len(self.text) + sum(len(c.name) + len(c.arguments) for c in self.tool_calls)

    def stored(self) -> ChatItem:
        """As a transcript keeps it: each image replaced by its placeholder."""
        if not self.images:
            return self
        text = "\n".join([self.text, *(i.placeholder() for i in self.images)] if self.text
                         else [i.placeholder() for i in self.images])
        return self.model_copy(update={"text": text, "images": ()})


class ToolSpec(_Part):
    """A client's function tool (SPEC §7), forwarded to the provider."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoice(_Part):
    """``tool_choice``: ``auto`` | ``none`` | ``required``, or ``function`` with the
    pinned ``name``; ``parallel`` is ``parallel_tool_calls`` (None: not given)."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str = ""
    parallel: bool | None = None


class EmbedParams(_Part):
    """What an embeddings run (SPEC §11) embeds: ``inputs`` (1 to 2,048 non-empty
    texts), each to one vector of ``dimensions`` values (None: the model's own)."""

    inputs: tuple[str, ...]
    dimensions: int | None = None


class RunRequest(_Wire):
    """One agent turn, queued on ``runs.<sessionToken>``."""

    type: Literal["run"] = "run"
    run_id: str
    session_key: str
    agent_id: str
    message: str
    extra_system_prompt: str = ""
    params: SamplingParams = SamplingParams()
    events_subject: str
    # Unix time the gateway accepted the request (for queue-wait metrics).
    created: float
    # The gateway generated the session key and never disclosed it (a stateless
    # call): no other run can join the session, so workers skip ordering and leases.
    ephemeral: bool = False
    # The client reads the reply as it is generated (SSE, WebSocket, CLI). When
    # false, the worker sends no deltas, only the final text.
    stream: bool = True
    # Structured input (SPEC §7/§8), when the plain ``message`` cannot say it:
    # images, or tool traffic. A stateless run gets the client's whole
    # conversation; a session run the items after the client's last assistant
    # message (the transcript holds the rest). Empty: ``message`` as user text.
    input: tuple[ChatItem, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    # ``x-openclaw-model``: ``provider/model`` replacing the agent's model.
    model: str | None = None
    # Set when the request is too large for one bus message: the whole request
    # is the object of that name in the payloads bucket (bus/payloads.py).
    payload: str = ""
    # An embeddings request (SPEC §11) rather than an agent turn: always
    # ephemeral, its embedding model in ``model``; answered by ``Embedded``.
    embed: EmbedParams | None = None
    # The client shows the agent's tool steps (WS caps `tool-events`, the CLI):
    # only then does the worker send ToolEvents.
    tool_events: bool = False


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Event(_Wire):
    seq: int
    attempt: int


class Queued(_Event):
    """A worker holds the run, waiting for its session's earlier run to end.

    ``Queued``, ``Accepted`` and ``Heartbeat`` are sent as NATS *requests*: the
    owning gateway answers :data:`REPLY_OK` while it still wants the run and
    :data:`REPLY_GONE` once its client has gone; "no responders" means the
    gateway process is gone. Either way the worker abandons the run, so a run
    never executes behind an absent client's back.
    """

    type: Literal["queued"] = "queued"
    # Who holds the run, and its JetStream delivery's reply subject: if that
    # worker dies, the run's gateway hands the run back (a nak) on its behalf.
    worker_id: str = ""
    ack: str = ""


class Accepted(_Event):
    """A worker owns the run and has started it (``worker_id``, ``ack``: as for
    :class:`Queued`)."""

    type: Literal["accepted"] = "accepted"
    worker_id: str
    ack: str = ""


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str


def encode_delta(seq: int, attempt: int, text: str) -> bytes:
    """``Delta(seq=…, attempt=…, text=…).model_dump_json().encode()``, byte for byte
    (tests/test_messages.py checks), at a tenth of the cost: one per streamed token."""
    return orjson.dumps({"v": WIRE_VERSION, "seq": seq, "attempt": attempt,
                         "type": "delta", "text": text})


class ToolCallChunk(_Part):
    """A piece of a streamed tool call: the first piece of a call carries its
    ``id`` and ``name``; every piece carries the next ``arguments`` fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolDelta(_Event):
    """Streamed tool-call pieces, in order (sent after the text before them)."""

    type: Literal["tool_delta"] = "tool_delta"
    calls: tuple[ToolCallChunk, ...]


FinishReason = Literal["stop", "length", "tool_calls"]


class Heartbeat(_Event):
    type: Literal["heartbeat"] = "heartbeat"


class Done(_Event):
    type: Literal["done"] = "done"
    text: str
    usage: Usage = Usage()
    finish_reason: FinishReason = "stop"
    tool_calls: tuple[ToolCall, ...] = ()
    # A reply too large for one bus message: ``text`` is in the payloads bucket
    # under this name (bus/payloads.py), and empty here.
    body: str = ""


def pack_vector(values: Sequence[float]) -> str:
    """An embedding vector on the wire: the base64 of its float32 values,
    little-endian (what OpenAI's ``encoding_format: base64`` returns)."""
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def unpack_vector(packed: str) -> list[float]:
    """The values of a :func:`pack_vector` text."""
    values = array.array("f", base64.b64decode(packed))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


class Embedded(_Event):
    """The answer to an embeddings run: one vector per input, in input order,
    each as :func:`pack_vector` gives it. A result too large for one bus message
    is the JSON array of those texts in the payloads bucket under ``body``
    (``vectors`` then empty), as for :class:`Done`."""

    type: Literal["embedded"] = "embedded"
    vectors: tuple[str, ...] = ()
    usage: Usage = Usage()
    body: str = ""


class Failed(_Event):
    """The run ended without a reply: mapped to the OpenAI error envelope by the gateway."""

    type: Literal["error"] = "error"
    status: int
    error_type: str
    message: str
    code: str | None = None
    retry_after: float | None = None


class ToolEvent(_Event):
    """A step of the agent's own tool loop (SPEC §9): a call starting (``args``:
    its JSON text) or its result (``result`` cut to 4 KB, ``is_error``). ``name``
    is the model-facing ``<server>__<tool>``."""

    type: Literal["tool"] = "tool"
    phase: Literal["start", "result"]
    name: str
    call_id: str
    args: str = ""
    result: str = ""
    is_error: bool = False


Event = Annotated[
    Queued | Accepted | Delta | ToolDelta | ToolEvent | Heartbeat | Done | Embedded | Failed,
    Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


# SPEC §7: a tool result that answers no call (checked by the gateway against the
# request's own conversation, by the worker against a session's pending calls).
UNMATCHED_TOOL_RESULT = "`tool_call_id` '{}' does not match a pending tool call."

REPLY_OK = b"ok"
REPLY_GONE = b"gone"
# The gateway moved on from this attempt (its worker was taken for dead and the
# run handed to another): stop it, and leave its JetStream message alone.
REPLY_STALE = b"stale"


def decode_event(data: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(data)


class Turn(_Wire):
    """One completed exchange in a session transcript (stored atomically): its
    input (``user``: the text; ``input``: the structured items when the input was
    more than user text — tool results, images as placeholders) and its reply
    (``assistant`` text and ``tool_calls``)."""

    type: Literal["turn"] = "turn"
    run_id: str
    agent_id: str
    user: str
    assistant: str
    ts: float
    usage: Usage = Usage()
    input: tuple[ChatItem, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    # The agent's own tool loop (SPEC §9): each round's assistant message with
    # its agent tool calls, then their results, before the final reply, whose
    # text is then ``reply`` (``assistant`` is all the text the client saw).
    steps: tuple[ChatItem, ...] = ()
    reply: str | None = None
    # A turn too large for one bus message is stored as an object of the
    # payloads bucket under this name; the transcript holds this stub.
    body: str = ""

    def size(self) -> int:
        """Characters it costs against a history budget."""
        if not self.input and not self.tool_calls and not self.steps:
            return len(self.user) + len(self.assistant)
        size = len(self.assistant) + sum(len(c.name) + len(c.arguments) for c in self.tool_calls)
        size += sum(item.size() for item in self.steps)
        if self.input:
            return size + sum(item.size() for item in self.input)
        return size + len(self.user)

    def input_items(self) -> tuple[ChatItem, ...]:
        return self.input or (ChatItem(role="user", text=self.user),)

    def reply_item(self) -> ChatItem:
        text = self.assistant if self.reply is None else self.reply
        return ChatItem(role="assistant", text=text, tool_calls=self.tool_calls)

    def structured(self) -> bool:
        """More than user text and assistant text."""
        return bool(self.input or self.tool_calls or self.steps)
