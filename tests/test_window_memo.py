"""workers/window_memo.py: what a session's history window becomes (the
provider's JSON, the chat messages of its turns), built once and then extended
run by run, is always exactly what building it afresh gives; and an extended
window builds only its new items."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.messages import RunRequest, Turn
from workers.providers.base import ChatMessage, ProviderRequest
from workers.providers.openai_completions import _request_body
from workers.run import _plain_history, build_request
from workers.window_memo import WindowMemo


class Counted:
    """An encoder that counts the messages it encoded."""

    def __init__(self) -> None:
        self.encoded = 0

    def __call__(self, messages: Sequence[ChatMessage]) -> list[bytes]:
        self.encoded += len(messages)
        return [orjson.dumps({"role": m.role, "content": m.content}) for m in messages]


def plain(messages: Sequence[ChatMessage]) -> bytes:
    return b",".join(Counted()(messages))


def joiner(encode: Counted) -> WindowMemo[ChatMessage, bytes, bytes]:
    """As the OpenAI provider keeps its histories' JSON."""
    return WindowMemo(encode, lambda piece: len(piece) + 1, b",".join,
                      lambda kept, new: kept + b"," + new)


# A step of a session: how many messages it gains, and how many its window keeps
# at most (a budget cuts the front); or a step of another session in between;
# or the same history again (an agent's next tool round); or the window read
# again from the bus (new objects).
steps = st.lists(st.one_of(
    st.tuples(st.just("turn"), st.integers(1, 5), st.integers(1, 40)),
    st.tuples(st.just("other"), st.integers(1, 3), st.integers(1, 10)),
    st.tuples(st.just("again"), st.just(0), st.just(0)),
    st.tuples(st.just("reread"), st.just(0), st.just(0))), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_joined_histories_are_the_messages_json(plan: list[tuple[str, int, int]]) -> None:
    encode = Counted()
    join = joiner(encode)
    sessions: dict[str, list[ChatMessage]] = {"a": [], "b": []}
    windows: dict[str, tuple[ChatMessage, ...]] = {}
    made = 0
    for kind, gained, budget in plan:
        name = "b" if kind == "other" else "a"
        if kind in ("turn", "other"):
            for _ in range(gained):
                made += 1
                sessions[name].append(ChatMessage("user" if made % 2 else "assistant",
                                                  f"m{made} é \"q\""))
            window = tuple(sessions[name][-budget:])
        elif kind == "reread":
            window = tuple(ChatMessage(m.role, m.content) for m in windows.get(name, ()))
            sessions[name] = list(window)
        else:
            window = windows.get(name, ())
        if not window:
            continue
        windows[name] = window
        assert join(window) == plain(window)


def test_a_grown_window_encodes_only_its_new_messages() -> None:
    encode = Counted()
    join = joiner(encode)
    messages = [ChatMessage("user", f"m{i}") for i in range(200)]
    assert join(tuple(messages[:100])) == plain(messages[:100])
    assert encode.encoded == 100
    # Two more messages, and the budget drops the three oldest.
    assert join(tuple(messages[3:102])) == plain(messages[3:102])
    assert encode.encoded == 102
    assert join(tuple(messages[3:102])) == plain(messages[3:102])  # again: nothing
    assert encode.encoded == 102
    # A window whose start is not where the kept one's length says: encoded anew.
    shifted = tuple([ChatMessage("user", "new start"), *messages[4:104]])
    assert join(shifted) == plain(shifted)
    assert encode.encoded == 102 + len(shifted)


def test_the_request_body_carries_the_history_then_the_input() -> None:
    history = (ChatMessage("user", "one"), ChatMessage("assistant", "echo: one"))
    request = ProviderRequest(model="m", system="be brief",
                              messages=(*history, ChatMessage("user", "two")), history=2)
    body = orjson.loads(orjson.dumps(_request_body(request)))
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "echo: one"},
        {"role": "user", "content": "two"}]


def test_a_plain_history_becomes_the_same_messages_kept_or_not() -> None:
    turns = [Turn(run_id=f"r{i}", agent_id="main", user=f"u{i}", assistant=f"a{i}", ts=0.0)
             for i in range(30)]
    for start, end in [(0, 10), (0, 12), (3, 14), (3, 14), (9, 30)]:
        window = turns[start:end]
        kept = _plain_history(window)
        assert kept is not None
        assert [(m.role, m.content) for m in kept] == [
            (role, text) for t in window for role, text in (("user", t.user),
                                                            ("assistant", t.assistant))]
    # What a run's request holds: the history, then the input, counted as such.
    run = RunRequest(run_id="r", session_key="k", agent_id="main", message="now",
                     events_subject="evt.g.r", created=0.0)
    request = build_request("m", "sys", run, turns[9:30])
    assert request.history == 42 and request.messages[-1] == ChatMessage("user", "now")
    assert request.messages[:42] == _plain_history(turns[9:30])
