"""The binary logits message of the legacy WebSocket channel: exact round trips, clear errors."""

from __future__ import annotations

import numpy
import pytest

from lmql_backends.legacy_frames import HEADER_LENGTH, decode_logits_frame, encode_logits_frame

HEADER = {"client_id": "127.0.0.1-c", "sample_id": 7}


def make_rows(num_rows: int, width: int = 5) -> list[numpy.ndarray]:
    generator = numpy.random.default_rng(num_rows)
    return [generator.standard_normal(width).astype(numpy.float32) for _ in range(num_rows)]


@pytest.mark.parametrize("num_rows", [1, 3])
def test_batched_rows_come_back_bit_for_bit(num_rows):
    rows = make_rows(num_rows)
    rows[0][1:4] = [numpy.inf, -numpy.inf, numpy.nan]  # binary carries what JSON needs special words for
    result = decode_logits_frame(encode_logits_frame(HEADER, "next_token_logits", rows, is_batched=True))
    values = result.pop("next_token_logits")
    assert result == HEADER
    assert values.dtype == numpy.float32 and values.shape == (num_rows, 5)
    assert values.tobytes() == b"".join(row.tobytes() for row in rows)
    values[0, 0] = 1.0  # writable: torch.from_numpy takes it without a warning


def test_an_unbatched_row_keeps_its_1d_shape():
    [row] = make_rows(1)
    values = decode_logits_frame(encode_logits_frame(HEADER, "next_token_logits", [row], is_batched=False))
    assert values["next_token_logits"].shape == (5,)
    numpy.testing.assert_array_equal(values["next_token_logits"], row)


def test_the_layout_is_a_length_prefixed_json_header_then_little_endian_floats():
    data = encode_logits_frame({"sample_id": 1}, "f", [numpy.array([1.5, -2.0], numpy.float32)], is_batched=False)
    (num_header_bytes,) = HEADER_LENGTH.unpack_from(data)
    assert data[4:4 + num_header_bytes] == b'{"sample_id": 1, "field": "f", "shape": [2]}'
    assert numpy.frombuffer(data[4 + num_header_bytes:], "<f4").tolist() == [1.5, -2.0]


@pytest.mark.parametrize("cut", [2, 10, -1])
def test_truncated_messages_are_refused_with_their_size(cut):
    data = encode_logits_frame(HEADER, "next_token_logits", make_rows(2), is_batched=True)
    with pytest.raises(ValueError, match="binary message"):
        decode_logits_frame(data[:cut])


def test_a_shape_that_does_not_match_the_values_is_refused():
    data = encode_logits_frame(HEADER, "next_token_logits", make_rows(2), is_batched=True)
    with pytest.raises(ValueError, match=r"declares shape \[2, 5\] but holds 9"):
        decode_logits_frame(data[:-4])
