"""workers/providers/history_join.py: a session's history, encoded once and then
extended run by run, is always exactly the messages' JSON joined with commas;
and an extended history encodes only its new messages."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.providers.base import ChatMessage, ProviderRequest
from workers.providers.history_join import HistoryJoin
from workers.providers.openai_completions import _request_body


class Counted:
    """An encoder that counts the messages it encoded."""

    def __init__(self) -> None:
        self.encoded = 0

    def __call__(self, messages: Sequence[ChatMessage]) -> list[bytes]:
        self.encoded += len(messages)
        return [orjson.dumps({"role": m.role, "content": m.content}) for m in messages]


def plain(messages: Sequence[ChatMessage]) -> bytes:
    return b",".join(Counted()(messages))


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
    join: HistoryJoin[ChatMessage] = HistoryJoin(encode)
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
        assert join.joined(window) == plain(window)


def test_a_grown_window_encodes_only_its_new_messages() -> None:
    encode = Counted()
    join: HistoryJoin[ChatMessage] = HistoryJoin(encode)
    messages = [ChatMessage("user", f"m{i}") for i in range(200)]
    assert join.joined(tuple(messages[:100])) == plain(messages[:100])
    assert encode.encoded == 100
    # Two more messages, and the budget drops the three oldest.
    assert join.joined(tuple(messages[3:102])) == plain(messages[3:102])
    assert encode.encoded == 102
    assert join.joined(tuple(messages[3:102])) == plain(messages[3:102])  # again: nothing
    assert encode.encoded == 102
    # A window whose start is not where the kept one's length says: encoded anew.
    shifted = tuple([ChatMessage("user", "new start"), *messages[4:104]])
    assert join.joined(shifted) == plain(shifted)
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
