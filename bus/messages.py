"""Wire messages between gateways and workers.

Pure data: pydantic models and nothing that touches NATS, HTTP or a provider.
Every message has a ``type`` discriminator and a version ``v``; unknown fields are
rejected so a mismatched peer fails loudly instead of dropping data.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


class Heartbeat(_Event):
    type: Literal["heartbeat"] = "heartbeat"


class Done(_Event):
    type: Literal["done"] = "done"
    text: str
    usage: Usage = Usage()
    finish_reason: Literal["stop", "length"] = "stop"


class Failed(_Event):
    """The run ended without a reply: mapped to the OpenAI error envelope by the gateway."""

    type: Literal["error"] = "error"
    status: int
    error_type: str
    message: str
    code: str | None = None
    retry_after: float | None = None


Event = Annotated[
    Queued | Accepted | Delta | Heartbeat | Done | Failed, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


REPLY_OK = b"ok"
REPLY_GONE = b"gone"
# The gateway moved on from this attempt (its worker was taken for dead and the
# run handed to another): stop it, and leave its JetStream message alone.
REPLY_STALE = b"stale"


def decode_event(data: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(data)


class Turn(_Wire):
    """One completed exchange in a session transcript (stored atomically)."""

    type: Literal["turn"] = "turn"
    run_id: str
    agent_id: str
    user: str
    assistant: str
    ts: float
    usage: Usage = Usage()
