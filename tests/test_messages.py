"""bus.messages: the hand-encoded delta is the model's encoding, byte for byte."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from bus.messages import Delta, decode_event, encode_delta


@given(seq=st.integers(min_value=0, max_value=2**53), attempt=st.integers(0, 1000),
       text=st.text())
@example(seq=1, attempt=1, text='quote " backslash \\ newline \n nul \x00 emoji 🦀')
@example(seq=1, attempt=1, text="lone surrogate-free \u2028\u2029")
def test_encode_delta_is_the_models_encoding(seq: int, attempt: int, text: str) -> None:
    encoded = encode_delta(seq, attempt, text)
    assert encoded == Delta(seq=seq, attempt=attempt, text=text).model_dump_json().encode()
    assert decode_event(encoded) == Delta(seq=seq, attempt=attempt, text=text)
