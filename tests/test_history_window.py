"""End to end: a session longer than its history budget, served by two workers in
turn. Each run sends the upstream exactly the newest turns that fit
``session.historyBudgetChars``, the transcript keeps every turn, and each stored
turn records where the next run's window starts (bus/transcripts.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import openai
import pytest

from bus import subjects
from bus.messages import Turn
from bus.transcripts import WINDOW_BUDGET, WINDOW_START, within_budget
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config

BUDGET = 100  # characters of user + assistant text: two of this test's turns fit


@pytest.fixture(scope="module")
def small_budget(upstream: FakeOpenAI,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config: dict[str, Any] = base_config(upstream)
    config["session"] = {"historyBudgetChars": BUDGET}
    st = Stack.start(tmp_path_factory.mktemp("history"), upstream, config, workers=2)
    try:
        yield st
    finally:
        st.stop()


async def stored(url: str, key: str) -> list[tuple[Turn, dict[str, str]]]:
    """Every stored turn of the session with its headers, read one by one."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        subject = subjects.transcript(subjects.session_token(key))
        out: list[tuple[Turn, dict[str, str]]] = []
        seq = 1
        while True:
            try:
                msg = await js.get_msg(subjects.TX_STREAM, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return out
            assert msg.seq is not None
            out.append((Turn.model_validate_json(msg.data or b""), msg.headers or {}))
            seq = msg.seq + 1
    finally:
        await nc.close()


def test_runs_see_the_newest_turns_that_fit(small_budget: Stack) -> None:
    upstream = small_budget.upstream
    key = f"long-chat-{uuid.uuid4().hex[:8]}"
    sent: list[str] = []
    c = openai.OpenAI(base_url=f"{small_budget.url}/v1", api_key=TOKEN, max_retries=0,
                      timeout=30)
    with c:
        for i in range(8):
            text = f"turn {i} {uuid.uuid4().hex[:8]}"
            sent.append(text)
            reply = c.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": text}],
                extra_headers={"x-openclaw-session-key": key})
            assert reply.choices[0].message.content == f"echo: {text}"
    turns = [Turn(run_id=str(i), agent_id="main", user=t, assistant=f"echo: {t}", ts=0.0)
             for i, t in enumerate(sent)]
    for i, text in enumerate(sent):
        (rec,) = [r for r in upstream.requests if r.body["messages"][-1]["content"] == text]
        history = rec.body["messages"][1:-1]  # after the system prompt, before the input
        expected = within_budget(turns[:i], BUDGET)
        assert history == [m for t in expected for m in (
            {"role": "user", "content": t.user},
            {"role": "assistant", "content": t.assistant})], (i, history)
        assert len(expected) == min(i, 2)  # the budget does cut: two turns fit
    # Every turn is kept (two workers took the session's runs in turn).
    kept = asyncio.run(stored(small_budget.nats.url, key))
    assert [t.user for t, _ in kept] == sent
    for n, (_, headers) in enumerate(kept):
        assert headers[WINDOW_BUDGET] == str(BUDGET)
        start = int(headers[WINDOW_START])
        assert start == 0 if n == 0 else start > 0
