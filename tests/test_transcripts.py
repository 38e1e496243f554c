"""Session transcripts (bus.transcripts): appends fenced by the expected last subject
sequence, dedupe by run id, per-session reset, against a real nats-server; and the
pure history budget."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus import subjects
from bus.connection import connect, ensure_bus
from bus.messages import Turn, Usage
from bus.nats_adapter import AckedPublisher
from bus.subjects import session_token
from bus.transcripts import StaleTranscriptError, Transcripts, Window, within_budget
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer

BUS = BusConfig(ack_wait_seconds=3)


def turn(run_id: str, user: str = "hi", assistant: str = "hello") -> Turn:
    return Turn(run_id=run_id, agent_id="main", user=user, assistant=assistant, ts=1.0,
                usage=Usage(prompt_tokens=1, completion_tokens=2))


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    nc = await connect(nats_server.url, "test-transcripts")
    try:
        yield nc, await ensure_bus(nc, BUS, SessionConfig())
    finally:
        await nc.close()


@pytest.fixture
def js(bus: tuple[Client, JetStreamContext]) -> JetStreamContext:
    return bus[1]


@pytest.fixture(params=["worker's way", "gateway's way", "ordered consumer, js.publish"])
async def tx(request: pytest.FixtureRequest,
             bus: tuple[Client, JetStreamContext]) -> AsyncIterator[Transcripts]:
    """Every way of reading and writing: the worker's (leader and batched direct
    gets, bus.nats_adapter.AckedPublisher), the gateway's (the same reads on a
    connection of its own, js.publish) and the fallbacks (nats-py's get_msg, an
    ordered consumer, js.publish)."""
    nc, js = bus
    if request.param == "gateway's way":
        yield Transcripts(js, nc)
        return
    if request.param != "worker's way":
        yield Transcripts(js)
        return
    publisher = AckedPublisher(nc)
    await publisher.start()
    try:
        yield Transcripts(js, nc, publisher)
    finally:
        await publisher.close()


async def stored_count(js: JetStreamContext, token: str) -> int:
    subject = subjects.transcript(token)
    info = await js.stream_info(subjects.TX_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_load_unknown_session(tx: Transcripts) -> None:
    assert await tx.load(session_token("nobody")) == ([], 0)
    assert await tx.last_seq(session_token("nobody")) == 0


async def test_appends_load_in_order(js: JetStreamContext, tx: Transcripts) -> None:
    token = session_token("chat.with *dots* and >")
    other = session_token("interleaved")
    expected: list[Turn] = []
    last = 0
    other_last = 0
    for i in range(25):
        t = turn(f"run-{i}", user=f"question {i}", assistant=f"answer {i}")
        seq = await tx.append(token, t, last)
        assert seq > last
        last = seq
        expected.append(t)
        # Another session's writes interleave on the same stream.
        other_last = await tx.append(other, turn(f"other-{i}"), other_last)
    turns, loaded_last = await tx.load(token)
    assert turns == expected
    assert loaded_last == last
    assert await tx.last_seq(token) == last
    assert await stored_count(js, token) == 25
    other_turns, _ = await tx.load(other)
    assert [t.run_id for t in other_turns] == [f"other-{i}" for i in range(25)]


async def test_load_then_append_continues(tx: Transcripts) -> None:
    token = session_token("continue")
    await tx.append(token, turn("r1"), 0)
    turns, last = await tx.load(token)
    seq = await tx.append(token, turn("r2"), last)
    turns, last = await tx.load(token)
    assert [t.run_id for t in turns] == ["r1", "r2"]
    assert last == seq


async def test_stale_append_is_rejected(js: JetStreamContext, tx: Transcripts) -> None:
    token = session_token("stale")
    seq1 = await tx.append(token, turn("r1"), 0)
    # A writer that read the empty transcript before r1 was stored.
    with pytest.raises(StaleTranscriptError):
        await tx.append(token, turn("r2"), 0)
    # A writer that claims to have read more than exists.
    with pytest.raises(StaleTranscriptError):
        await tx.append(token, turn("r3"), seq1 + 10)
    assert await stored_count(js, token) == 1
    turns, last = await tx.load(token)
    assert [t.run_id for t in turns] == ["r1"]
    assert last == seq1
    # The rejected run can still be stored once its writer re-reads (the rejection
    # did not register its message id as a duplicate).
    seq2 = await tx.append(token, turn("r2"), last)
    assert seq2 > seq1
    assert [t.run_id for t in (await tx.load(token))[0]] == ["r1", "r2"]


async def test_stale_append_on_one_session_ignores_others(tx: Transcripts) -> None:
    a, b = session_token("a"), session_token("b")
    await tx.append(a, turn("a1"), 0)
    # b's expected sequence is about b's subject only.
    seq_b = await tx.append(b, turn("b1"), 0)
    await tx.append(a, turn("a2"), await tx.last_seq(a))
    await tx.append(b, turn("b2"), seq_b)


async def test_republished_turn_is_not_duplicated(js: JetStreamContext, tx: Transcripts) -> None:
    token = session_token("retry")
    t = turn("chatcmpl_1")
    seq = await tx.append(token, t, 0)
    # A retried publish (e.g. the ack was lost): same run id, same expected seq.
    try:
        again = await tx.append(token, t, 0)
    except StaleTranscriptError:
        pass
    else:
        assert again == seq  # acknowledged as a duplicate of the stored message
    assert await stored_count(js, token) == 1
    turns, last = await tx.load(token)
    assert turns == [t]
    assert last == seq


async def test_republished_turn_after_reread_is_deduped(
        js: JetStreamContext, tx: Transcripts) -> None:
    """Even with a current expected sequence, the run id (Nats-Msg-Id) stops a second copy."""
    token = session_token("retry after re-read")
    t1 = turn("chatcmpl_1")
    seq1 = await tx.append(token, t1, 0)
    seq2 = await tx.append(token, turn("chatcmpl_2"), seq1)
    assert await tx.append(token, t1, seq2) == seq1  # the duplicate's original sequence
    assert await stored_count(js, token) == 2
    turns, last = await tx.load(token)
    assert ids(turns) == ["chatcmpl_1", "chatcmpl_2"]
    assert last == seq2


async def test_reset_purges_one_session(js: JetStreamContext, tx: Transcripts) -> None:
    a, b = session_token("reset me"), session_token("keep me")
    for i in range(3):
        await tx.append(a, turn(f"a{i}"), await tx.last_seq(a))
        await tx.append(b, turn(f"b{i}"), await tx.last_seq(b))
    b_before = await tx.load(b)
    await tx.reset(a)
    assert await tx.load(a) == ([], 0)
    assert await stored_count(js, a) == 0
    assert await tx.load(b) == b_before
    # A reset session starts again from empty.
    await tx.append(a, turn("a-new"), 0)
    assert [t.run_id for t in (await tx.load(a))[0]] == ["a-new"]
    # Resetting an unknown session is harmless.
    await tx.reset(session_token("never used"))
    assert await tx.load(b) == b_before


# --------------------------------------------------------------------------- history window


class CountingReads:
    """Wraps ``tx._read`` to record how many turns each read returned."""

    def __init__(self, tx: Transcripts) -> None:
        self.sizes: list[int] = []
        self._read = tx._read

        async def read(token: str, start: int, last: int) -> list[tuple[int, Turn]]:
            got = await self._read(token, start, last)
            self.sizes.append(len(got))
            return got

        tx._read = read  # type: ignore[method-assign]


async def converse(tx: Transcripts, token: str, sizes: list[int], *, budget: int,
                   other: str | None = None, prefix: str = "r") -> list[Turn]:
    """Run ``len(sizes)`` turns the way a worker does (window read, windowed append),
    checking every window against the whole transcript, and against what a worker
    that kept the previous window computes without reading (``Window.after``: the
    worker's history cache); the turns stored. (Run ids are the stream's
    de-duplication ids: unique per test, as they are in use.)"""
    stored: list[Turn] = []
    other_last = 0
    kept: Window | None = None
    for i, size in enumerate(sizes):
        window = await tx.load_window(token, budget)
        assert window.turns == within_budget(stored, budget)
        assert window.last == (stored[-1] if stored else None)
        if kept is not None:
            assert kept == window
        new = sized(f"{prefix}{i}", size)
        last = await tx.append(token, new, window.last_seq, window)
        assert last > window.last_seq
        kept = window.after(new, last)
        stored.append(new)
        if other is not None:  # another session interleaves on the stream
            other_last = await tx.append(other, sized(f"{prefix}-other{i}", 5), other_last)
    return stored


async def test_window_reads_only_the_turns_within_budget(tx: Transcripts) -> None:
    token = session_token("long chat")
    reads = CountingReads(tx)
    stored = await converse(tx, token, [30] * 60, budget=100,
                            other=session_token("neighbour"))
    # Every read after the first turns is the window (3 turns of 30 fit 100), never
    # the whole, growing transcript.
    assert max(reads.sizes) <= 4
    window = await tx.load_window(token, 100)
    assert ids(window.turns) == ["r57", "r58", "r59"]
    assert window.seqs == sorted(window.seqs) and len(window.seqs) == 3
    assert window.last_seq == await tx.last_seq(token)
    assert window.turns == within_budget(stored, 100)


async def test_window_with_varied_sizes_matches_the_budget_rule(tx: Transcripts) -> None:
    rng = random.Random(5)
    for budget in (0, 7, 50, 400):
        token = session_token(f"varied {budget}")
        sizes = [rng.choice([0, 1, 5, 20, 49, 50, 51, 120, 500]) for _ in range(30)]
        stored = await converse(tx, token, sizes, budget=budget, prefix=f"b{budget}-")
        # A smaller budget than the one recorded reads from the recorded start.
        for smaller in (0, budget // 2):
            window = await tx.load_window(token, smaller)
            assert window.turns == within_budget(stored, smaller)
            assert window.last == stored[-1]


async def test_turn_larger_than_the_budget(tx: Transcripts) -> None:
    token = session_token("huge turn")
    await converse(tx, token, [10, 10, 500], budget=100)
    reads = CountingReads(tx)
    window = await tx.load_window(token, 100)
    assert window.turns == [] and window.seqs == []
    assert window.last is not None and window.last.run_id == "r2"  # seen for de-duplication
    assert reads.sizes == []  # the last turn said its window is itself: nothing more to read
    seq = await tx.append(token, sized("r3", 10), window.last_seq, window)
    window = await tx.load_window(token, 100)
    assert ids(window.turns) == ["r3"] and window.last_seq == seq


async def test_window_falls_back_to_the_whole_transcript(tx: Transcripts) -> None:
    """Turns stored without a window (an older version, Transcripts.record), or a
    budget above the one recorded: the whole transcript is read, the answer is right."""
    token = session_token("older turns")
    stored = [sized(f"r{i}", 30) for i in range(6)]
    last = 0
    for t in stored:
        last = await tx.append(token, t, last)  # no window: no headers
    reads = CountingReads(tx)
    window = await tx.load_window(token, 100)
    assert reads.sizes == [6]
    assert window.turns == within_budget(stored, 100)
    stored.append(sized("r6", 30))
    await tx.append(token, stored[-1], window.last_seq, window)
    window = await tx.load_window(token, 100)
    assert reads.sizes[-1] <= 4 and window.turns == within_budget(stored, 100)
    bigger = await tx.load_window(token, 1000)  # recorded for 100: reads everything
    assert reads.sizes[-1] == 7 and bigger.turns == stored


async def test_window_of_unknown_and_reset_sessions(tx: Transcripts) -> None:
    empty = await tx.load_window(session_token("nobody"), 100)
    assert (empty.turns, empty.last, empty.last_seq) == ([], None, 0)
    token = session_token("reset window")
    await converse(tx, token, [10, 10], budget=100)
    await tx.reset(token)
    window = await tx.load_window(token, 100)
    assert (window.turns, window.last, window.last_seq) == ([], None, 0)
    await tx.append(token, sized("again", 10), 0, window)
    assert ids((await tx.load_window(token, 100)).turns) == ["again"]


async def test_reads_leave_no_consumer_behind(js: JetStreamContext, tx: Transcripts) -> None:
    """An ordered consumer per read used to stay on the server until reaped, and
    past 1,000 JetStream refused new ones: every stateful run then failed."""
    token = session_token("many reads")
    await converse(tx, token, [10] * 3, budget=100, prefix="reads-")
    for _ in range(40):
        assert len((await tx.load(token))[0]) == 3
        assert len((await tx.load_window(token, 15)).turns) == 1
    info = await js.stream_info(subjects.TX_STREAM)
    assert info.state.consumer_count == 0


# --------------------------------------------------------------------------- within_budget


def sized(run_id: str, size: int) -> Turn:
    """A turn whose budgeted size (user + assistant characters) is ``size``."""
    half = size // 2
    return turn(run_id, user="u" * half, assistant="a" * (size - half))


def ids(turns: list[Turn]) -> list[str]:
    return [t.run_id for t in turns]


def test_budget_empty_history() -> None:
    assert within_budget([], 100) == []
    assert within_budget([], 0) == []


def test_budget_zero_keeps_nothing() -> None:
    assert within_budget([sized("t1", 1), sized("t2", 10)], 0) == []


def test_budget_all_fit_exactly() -> None:
    turns = [sized("t1", 10), sized("t2", 20), sized("t3", 30)]
    assert within_budget(turns, 60) == turns
    assert within_budget(turns, 1000) == turns


def test_budget_drops_oldest_first() -> None:
    turns = [sized("t1", 10), sized("t2", 20), sized("t3", 30)]
    assert ids(within_budget(turns, 59)) == ["t2", "t3"]
    assert ids(within_budget(turns, 50)) == ["t2", "t3"]
    assert ids(within_budget(turns, 49)) == ["t3"]
    assert ids(within_budget(turns, 30)) == ["t3"]
    assert within_budget(turns, 29) == []


def test_budget_single_turn_larger_than_budget() -> None:
    assert within_budget([sized("big", 101)], 100) == []
    # The newest turn does not fit: nothing older is kept either (no gaps in history).
    assert within_budget([sized("small", 5), sized("big", 101)], 100) == []


def test_budget_keeps_a_contiguous_suffix() -> None:
    # An oversized turn in the middle cuts off everything before it.
    turns = [sized("old", 5), sized("big", 500), sized("new", 5)]
    assert ids(within_budget(turns, 100)) == ["new"]


def test_budget_counts_characters_not_bytes() -> None:
    t = turn("uni", user="é" * 10, assistant="😀" * 10)
    assert within_budget([t], 20) == [t]
    assert within_budget([t], 19) == []


def test_budget_does_not_mutate_input() -> None:
    turns = [sized("t1", 10), sized("t2", 20)]
    copy = list(turns)
    within_budget(turns, 20)
    assert turns == copy


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(st.lists(st.integers(min_value=0, max_value=50), max_size=15),
       st.integers(min_value=0, max_value=300))
def test_budget_properties(sizes: list[int], budget: int) -> None:
    turns = [sized(f"t{i}", s) for i, s in enumerate(sizes)]
    kept = within_budget(turns, budget)
    # A suffix of the history, in order, within the budget ...
    assert kept == turns[len(turns) - len(kept):]
    assert sum(sizes[len(sizes) - len(kept):]) <= budget
    # ... and the longest such suffix.
    if len(kept) < len(turns):
        assert sum(sizes[len(sizes) - len(kept) - 1:]) > budget
