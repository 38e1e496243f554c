"""gateway.sequencer.Sequencer on its own (no bus, no clock): attempts, gaps and
their resync, acceptance, and what the client is shown in each case."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Accepted, Delta, Done, Failed, Heartbeat, Queued, Usage
from gateway.sequencer import RunEvent, Sequencer


def acc(seq: int = 1, attempt: int = 1) -> Accepted:
    return Accepted(seq=seq, attempt=attempt, worker_id="w1")


def delta(seq: int, text: str, attempt: int = 1) -> Delta:
    return Delta(seq=seq, attempt=attempt, text=text)


def done(seq: int, text: str, attempt: int = 1) -> Done:
    return Done(seq=seq, attempt=attempt, text=text, usage=Usage(), finish_reason="stop")


def shown(seq: Sequencer, *events: RunEvent | Queued) -> list[tuple[str, str]]:
    """What the client sees, as (kind, text) pairs."""
    out: list[tuple[str, str]] = []
    for event in events:
        for item in seq.feed(event):
            out.append((type(item).__name__, getattr(item, "text", "")))
    return out


def test_a_plain_run_is_shown_as_it_came() -> None:
    seq = Sequencer()
    assert shown(seq, acc(1), delta(2, "Hel"), delta(3, "lo"), done(4, "Hello")) == [
        ("Accepted", ""), ("Delta", "Hel"), ("Delta", "lo"), ("Done", "Hello")]
    assert seq.accepted and seq.streamed and seq.ended and seq.gaps == 0
    assert seq.sent == 5


def test_a_run_without_a_notice_is_accepted_by_its_first_text_or_end() -> None:
    seq = Sequencer()
    assert shown(seq, delta(1, "a"), done(2, "a")) == [
        ("Accepted", ""), ("Delta", "a"), ("Done", "a")]
    quiet = Sequencer()
    assert shown(quiet, done(1, "all at once")) == [("Accepted", ""), ("Done", "all at once")]
    assert not quiet.streamed


def test_a_late_notice_and_unnumbered_events_show_nothing() -> None:
    seq = Sequencer()
    assert shown(seq, Queued(seq=0, attempt=1), Heartbeat(seq=0, attempt=1)) == []
    assert not seq.accepted
    assert shown(seq, delta(1, "x"), acc(2), Heartbeat(seq=0, attempt=1), done(3, "x")) == [
        ("Accepted", ""), ("Delta", "x"), ("Done", "x")]
    assert seq.gaps == 0


def test_a_lost_delta_is_made_up_from_the_final_text_exactly_once() -> None:
    seq = Sequencer()
    got = shown(seq, acc(1), delta(2, "one "), delta(4, "three "), delta(5, "four"),
                done(6, "one two three four"))
    assert got == [("Accepted", ""), ("Delta", "one "), ("Delta", "two three four"),
                   ("Done", "one two three four")]
    assert seq.gaps == 1
    assert "".join(text for kind, text in got if kind == "Delta") == "one two three four"


def test_a_stale_attempt_is_dropped() -> None:
    seq = Sequencer()
    shown(seq, acc(1, attempt=2))
    assert shown(seq, delta(2, "old", attempt=1), done(3, "old", attempt=1)) == []
    assert shown(seq, done(2, "new", attempt=2)) == [("Done", "new")]


def test_a_retry_before_any_text_is_transparent() -> None:
    seq = Sequencer()
    shown(seq, acc(1, attempt=1))
    # The first worker died silently; JetStream redelivered: numbering restarts.
    assert shown(seq, acc(1, attempt=2), delta(2, "hi", attempt=2), done(3, "hi", attempt=2)) \
        == [("Delta", "hi"), ("Done", "hi")]
    assert seq.attempt == 2 and seq.gaps == 0 and not seq.interrupted


def test_a_retry_after_text_was_shown_fails_as_interrupted() -> None:
    seq = Sequencer()
    shown(seq, acc(1), delta(2, "par"))
    out = seq.feed(acc(1, attempt=2))
    assert len(out) == 1 and isinstance(out[0], Failed)
    assert out[0].code == "interrupted" and out[0].status == 503
    assert seq.interrupted and seq.ended


def test_a_gap_in_a_new_attempt_is_judged_on_its_own_numbering() -> None:
    seq = Sequencer()
    shown(seq, acc(1), delta(3, "lost one"))  # a gap in attempt 1
    assert seq.resync
    fresh = Sequencer()
    shown(fresh, acc(1))
    shown(fresh, acc(1, attempt=2))
    assert not fresh.resync


@given(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 8), max_size=12),
       st.sets(st.integers(0, 12)))
def test_the_client_always_gets_the_whole_text_once(text: str, cuts: list[int],
                                                    lost: set[int]) -> None:
    """Whatever deltas are lost, the text shown is the reply, exactly once."""
    bounds = sorted({0, len(text), *(min(c * 5, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    events: list[RunEvent] = [acc(1)]
    events += [delta(i + 2, p) for i, p in enumerate(pieces) if i not in lost]
    events.append(done(len(pieces) + 2, text))
    seq = Sequencer()
    got = shown(seq, *events)
    assert "".join(t for kind, t in got if kind == "Delta") == text
    assert got[0][0] == "Accepted" and got[-1] == ("Done", text)
    assert [kind for kind, _ in got].count("Done") == 1


def test_a_newer_attempt_that_only_queues_never_ends_the_running_one() -> None:
    """A duplicate delivery held by another worker (waiting for the session's
    lease) sends queued notices of a newer attempt: the text goes on."""
    seq = Sequencer()
    shown(seq, acc(1, attempt=1), delta(2, "one "))
    assert shown(seq, Queued(seq=0, attempt=2), Heartbeat(seq=0, attempt=2)) == []
    assert shown(seq, delta(3, "two"), done(4, "one two")) == [
        ("Delta", "two"), ("Done", "one two")]
    assert not seq.interrupted and seq.attempt == 1


def test_tool_call_pieces_count_as_shown_and_a_gap_is_filled_from_done() -> None:
    from bus.messages import ToolCall, ToolCallChunk, ToolDelta, ToolEvent

    seq = Sequencer()
    first = ToolDelta(seq=2, attempt=1, calls=(
        ToolCallChunk(index=0, id="c0", name="f", arguments='{"a"'),))
    step = ToolEvent(seq=3, attempt=1, phase="start", name="srv__x", call_id="t1")
    # seq 4 (the rest of call 0 and call 1's start) is lost on the way.
    end = Done(seq=5, attempt=1, text="", finish_reason="tool_calls", tool_calls=(
        ToolCall(id="c0", name="f", arguments='{"a":1}'),
        ToolCall(id="c1", name="g", arguments="{}")))
    out = [item for event in (acc(1), first, step, end) for item in seq.feed(event)]
    assert [type(item).__name__ for item in out] == [
        "Accepted", "ToolDelta", "ToolEvent", "ToolDelta", "Done"]
    assert seq.streamed and seq.gaps == 1
    tail = out[3]
    assert isinstance(tail, ToolDelta)
    assert tail.calls == (ToolCallChunk(index=0, arguments=":1}"),
                          ToolCallChunk(index=1, id="c1", name="g", arguments="{}"))


def test_tool_steps_alone_keep_a_retry_transparent() -> None:
    from bus.messages import ToolEvent

    seq = Sequencer()
    step = ToolEvent(seq=2, attempt=1, phase="start", name="srv__x", call_id="t1")
    assert shown(seq, acc(1), step) == [("Accepted", ""), ("ToolEvent", "")]
    assert not seq.streamed
    assert shown(seq, acc(1, attempt=2), done(2, "ok", attempt=2)) == [("Done", "ok")]
    assert not seq.interrupted
