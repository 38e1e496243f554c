"""One hot session (issue 20): eight clients of the official ``openai`` SDK, half
through each of two gateways, send turns to the same session key at once, to
three workers. Every call succeeds; the upstream serves the session's turns one
at a time (a turn's request arrives after the previous turn's response ended),
each with every earlier turn of the session in order; the transcript holds every
turn once, in the order the upstream served them.

No speed claim: how fast a hot session goes, ``python -m bench.run`` (the
hot-session scenario) judges."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import openai
import orjson

from tests.fakes.openai_upstream import RequestRecord
from tests.faultkit import session_turns
from tests.helpers import TOKEN, Stack

CLIENTS = 8
TURNS_EACH = 6


def _last_user(record: RequestRecord) -> str:
    return str(record.body["messages"][-1]["content"])


async def _client(url: str, key: str, prompts: list[str]) -> list[tuple[str, str]]:
    """One client's turns, one after another: (prompt, reply text) each."""
    out: list[tuple[str, str]] = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0,
                                  timeout=60,
                                  default_headers={"x-openclaw-session-key": key}) as client:
        for prompt in prompts:
            reply = await client.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": prompt}])
            out.append((prompt, reply.choices[0].message.content or ""))
    return out


def test_hot_session_turns_are_served_one_at_a_time_in_order(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:10]
    key = f"hot:{tag}"
    prompts = [[f"{tag} c{c} t{t}" for t in range(TURNS_EACH)] for c in range(CLIENTS)]

    async def all_clients() -> list[list[tuple[str, str]]]:
        return await asyncio.gather(*(
            _client(stack.gateways[c % 2].url, key, prompts[c]) for c in range(CLIENTS)))

    results = asyncio.run(all_clients())

    # Every call succeeded with its own turn's reply.
    answered = [pair for client in results for pair in client]
    assert len(answered) == CLIENTS * TURNS_EACH
    for prompt, text in answered:
        assert text == f"echo: {prompt}", (prompt, text)

    # The upstream: one request per turn, one at a time.
    records = sorted((r for r in stack.upstream.requests
                      if tag in orjson.dumps(r.body).decode()), key=lambda r: r.started)
    served = [_last_user(r) for r in records]
    assert sorted(served) == sorted(p for client in prompts for p in client), served
    for earlier, later in itertools.pairwise(records):
        assert earlier.completed and earlier.ended is not None
        assert earlier.ended <= later.started, (_last_user(earlier), _last_user(later))
    # Each client's own turns in the order it sent them.
    for client in prompts:
        mine = [p for p in served if p in client]
        assert mine == client, mine

    # Each turn's request holds every earlier turn of the session, in order.
    for i, record in enumerate(records):
        history = record.body["messages"][1:-1]  # after the system prompt
        expected = [message for prompt in served[:i] for message in (
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"echo: {prompt}"})]
        assert history == expected, (i, history[-2:], expected[-2:])

    # The transcript: every turn once, in the order served.
    turns = asyncio.run(session_turns(stack.nats.url, key))
    assert [t.user for t in turns] == served
    assert [t.assistant for t in turns] == [f"echo: {p}" for p in served]
    assert len({t.run_id for t in turns}) == len(turns)
