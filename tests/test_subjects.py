"""Property tests of the session-key encoding and the subject builders (bus.subjects).

Session keys are free text; whatever they hold, a session token must be one valid
NATS subject token (so no key can add, remove or wildcard a subject level), must
decode back to its key, and distinct keys must never share a token.
"""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus import subjects
from bus.subjects import session_key_from_token, session_token

# Modest, deterministic runs (no example database, no deadline flakiness on slow CI).
PROPS = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PAIRS = settings(PROPS, max_examples=200)

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")

# The characters that are dangerous on a subject, plus control characters and
# assorted non-ASCII, so that generated keys hit them often.
NASTY = ".*> \t\r\n\x00\x01\x1f\x7f$%/\\=+é中😀\u200b\ufeff"
nasty_text = st.text(alphabet=st.sampled_from(NASTY), max_size=20)
# Default `st.text()` is all of Unicode minus surrogates.
keys = st.one_of(st.text(max_size=40), nasty_text, st.text(alphabet=string.printable))
# Lone surrogates are not valid UTF-8 but the encoding passes them through.
surrogate_keys = st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
    max_size=20,
)

SPECIAL_KEYS = [
    "", " ", ".", "..", "*", ">", "a.b", "a.*", "a.>", "runs.>", "\x00", "\x00\x00",
    "key with spaces", "\t\n", "_", "-", "__", "=", "é", "😀", "a\x00b",
]


def nats_tokens(subject: str) -> list[str]:
    return subject.split(".")


def is_valid_literal_token(token: str) -> bool:
    return TOKEN_RE.fullmatch(token) is not None


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    pat, sub = nats_tokens(pattern), nats_tokens(subject)
    for i, p in enumerate(pat):
        if p == ">":
            return i == len(pat) - 1 and len(sub) > i
        if i >= len(sub) or (p != "*" and p != sub[i]):
            return False
    return len(sub) == len(pat)


def test_subject_matches_helper() -> None:
    assert subject_matches("runs.>", "runs.abc")
    assert subject_matches("runs.>", "runs.a.b")
    assert not subject_matches("runs.>", "runs")
    assert subject_matches("sess.done.*", "sess.done.x")
    assert not subject_matches("sess.done.*", "sess.done.x.y")
    assert not subject_matches("tx.>", "runs.x")


# --------------------------------------------------------------------------- session_token


@PROPS
@given(keys)
def test_token_is_one_valid_subject_token(key: str) -> None:
    token = session_token(key)
    assert token, "a token is never empty"
    assert is_valid_literal_token(token), token
    assert nats_tokens(token) == [token]


@PROPS
@given(keys)
@example("")
@example("\x00")
@example("a.b.*.>")
def test_token_round_trips(key: str) -> None:
    assert session_key_from_token(session_token(key)) == key


@PROPS
@given(surrogate_keys)
def test_lone_surrogates_are_encoded_and_round_trip(key: str) -> None:
    token = session_token(key)
    assert is_valid_literal_token(token)
    assert session_key_from_token(token) == key


def test_special_keys() -> None:
    tokens = [session_token(k) for k in SPECIAL_KEYS]
    for key, token in zip(SPECIAL_KEYS, tokens, strict=True):
        assert is_valid_literal_token(token), (key, token)
        assert session_key_from_token(token) == key
    assert len(set(tokens)) == len(SPECIAL_KEYS)
    # The empty key has its own token, distinct from every non-empty key's.
    assert session_token("") == "_"
    assert session_token("_") != "_"


def test_surrogate_pair_differs_from_its_astral_character() -> None:
    # "\ud83d\ude00" (two lone surrogates) and "😀" are different strings.
    assert session_token("\ud83d\ude00") != session_token("😀")
    assert session_key_from_token(session_token("\ud83d\ude00")) == "\ud83d\ude00"


@PAIRS
@given(keys, keys)
def test_distinct_keys_give_distinct_tokens(a: str, b: str) -> None:
    assert (session_token(a) == session_token(b)) == (a == b)


@PAIRS
@given(nasty_text, nasty_text)
def test_distinct_nasty_keys_give_distinct_tokens(a: str, b: str) -> None:
    # A small alphabet makes near-collisions (shared prefixes, equal lengths) likely.
    assert (session_token(a) == session_token(b)) == (a == b)


@PAIRS
@given(keys, st.text(min_size=1, max_size=5))
def test_extended_key_gets_another_token(key: str, suffix: str) -> None:
    assert session_token(key) != session_token(key + suffix)
    assert session_token(key) != session_token(suffix + key)


@PAIRS
@given(st.lists(nasty_text, min_size=2, max_size=20, unique=True))
def test_many_keys_no_collision(batch: list[str]) -> None:
    assert len({session_token(k) for k in batch}) == len(batch)


# --------------------------------------------------------------------------- subject builders


@PROPS
@given(keys)
def test_session_subjects_have_fixed_shape(key: str) -> None:
    token = session_token(key)
    cases = [
        (subjects.run(token), 2, subjects.runs_all()),
        (subjects.transcript(token), 2, subjects.transcripts_all()),
        (subjects.lease_key(token), 3, subjects.leases_all()),
    ]
    for subject, count, wildcard in cases:
        parts = nats_tokens(subject)
        assert len(parts) == count, subject
        assert all(is_valid_literal_token(p.removeprefix("$")) for p in parts), subject
        assert subjects.last_token(subject) == token
        assert subject_matches(wildcard, subject)
        assert session_key_from_token(subjects.last_token(subject)) == key


@PAIRS
@given(keys, keys)
def test_session_subjects_never_shared(a: str, b: str) -> None:
    ta, tb = session_token(a), session_token(b)
    for build in (subjects.run, subjects.transcript, subjects.lease_key):
        assert (build(ta) == build(tb)) == (a == b)
    # One session's subject is never matched by another session's (literal) subject
    # used as a filter, e.g. a per-session purge or consumer filter.
    if a != b:
        assert not subject_matches(subjects.transcript(ta), subjects.transcript(tb))


ids = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=40)


@PROPS
@given(ids, ids)
def test_run_subjects_have_fixed_shape(gateway_id: str, run_id: str) -> None:
    evt = subjects.events(gateway_id, run_id)
    assert nats_tokens(evt) == ["evt", gateway_id, run_id]
    assert subject_matches(subjects.events_all(gateway_id), evt)
    assert subjects.last_token(evt) == run_id
    cancel = subjects.cancel(run_id)
    assert nats_tokens(cancel) == ["cancel", run_id]
    assert subject_matches(subjects.cancel_all(), cancel)
    assert subjects.last_token(cancel) == run_id


@PAIRS
@given(ids, ids, ids)
def test_events_of_one_gateway_are_not_seen_by_another(gw_a: str, gw_b: str, run_id: str) -> None:
    evt = subjects.events(gw_a, run_id)
    assert subject_matches(subjects.events_all(gw_b), evt) == (gw_a == gw_b)


def test_wildcards_and_names() -> None:
    assert subjects.runs_all() == "runs.>"
    assert subjects.transcripts_all() == "tx.>"
    assert subjects.leases_all() == "$KV.LEASES.*"
    assert subjects.cancel_all() == "cancel.*"
    names = [subjects.RUNS_STREAM, subjects.TX_STREAM, subjects.LEASES_BUCKET,
             subjects.WORKERS_BUCKET, subjects.RUNS_CONSUMER]
    assert all(is_valid_literal_token(n) for n in names)
    assert len(set(names)) == len(names)
    # Streams never overlap: a run is never stored as a transcript or vice versa.
    sample = session_token("x")
    assert not subject_matches(subjects.transcripts_all(), subjects.run(sample))
    assert not subject_matches(subjects.runs_all(), subjects.transcript(sample))
