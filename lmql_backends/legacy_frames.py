"""What the legacy API's client and server both read and write: JSON bodies, and the binary
message of the WebSocket channel (a forward's logits, exact and compact).

Layout of the binary message: a 4-byte little-endian length, that many bytes of JSON header (the
result object without its values, plus ``"field"`` naming the values' field and their
``"shape"``), then the float32 values, little-endian, row after row. Written by the server
(``server/legacy/socket.py``) and read by ``LegacyClient``; see ``legacy/PROTOCOL.md``, extension 15.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy
import orjson

HEADER_LENGTH = struct.Struct("<I")
#: on /queue answers: the server's channel takes ``input_ids_after`` (extension 16)
APPEND_HEADER = "X-Input-Ids-After"
#: a forward's field on the channel: its input_ids follow the row of this earlier sample_id
AFTER_FIELD = "input_ids_after"
#: starts the refusal of an ``input_ids_after`` the channel cannot resolve (a client then resends the whole row)
UNKNOWN_BASE_TEXT = "input_ids_after names a sample this channel does not hold"
#: digits enough for an integer beyond 64 bits (see load_json)
NUM_LONG_DIGITS = 19
#: every ASCII digit becomes "0", every other byte " " (one C-speed pass, where a regex would walk the text in Python-level steps)
DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))


def has_long_digit_run(body: bytes) -> bool:
    """Whether `body` holds NUM_LONG_DIGITS or more ASCII digits in a row."""
    return b"0" * NUM_LONG_DIGITS in body.translate(DIGITS_TO_ZERO)


def load_json(body: bytes | str) -> Any:
    """``json.loads(body)``, several times faster through orjson where both agree (logits, long ids).

    orjson reads an integer beyond 64 bits as a float (json: an exact int), so a body with a run
    of 19 or more digits, and anything orjson refuses (``NaN``, ``Infinity``, lone surrogates,
    ...), is read by ``json``: every body is judged exactly as ``json.loads`` judges it.
    """
    if isinstance(body, bytes) and not has_long_digit_run(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def encode_logits_frame(header: dict, field: str, rows: list[numpy.ndarray], is_batched: bool) -> bytes:
    """`rows` (1-D float arrays of equal length) under `header`; shape [rows, V], or [V] if not batched."""
    shape = [len(rows), len(rows[0])] if is_batched else [len(rows[0])]
    head = json.dumps({**header, "field": field, "shape": shape}).encode()
    values = b"".join(numpy.asarray(row, dtype="<f4").tobytes() for row in rows)
    return HEADER_LENGTH.pack(len(head)) + head + values


def decode_logits_frame(data: bytes) -> dict:
    """The result object of a binary message: the header's fields plus ``field: float32 array``.

    Raises ValueError when the message is truncated or its shape does not match its size.
    """
    if len(data) < HEADER_LENGTH.size:
        raise ValueError(f"a binary message of {len(data)} bytes is too short for its header length")
    (num_header_bytes,) = HEADER_LENGTH.unpack_from(data)
    start = HEADER_LENGTH.size + num_header_bytes
    if start > len(data):
        raise ValueError(f"a binary message of {len(data)} bytes declares a {num_header_bytes}-byte header")
    header = json.loads(data[HEADER_LENGTH.size:start])
    shape, field = header.pop("shape", None), header.pop("field", None)
    num_values = (len(data) - start) // 4
    if not is_valid_shape(shape) or math.prod(shape) != num_values or not isinstance(field, str):
        raise ValueError(f"a binary message declares shape {shape!r} but holds {num_values} float32 values")
    values = numpy.frombuffer(data, dtype="<f4", offset=start, count=num_values)
    header[field] = values.astype(numpy.float32).reshape(shape)  # a writable copy in native order
    return header


def is_valid_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) in (1, 2) and all(isinstance(n, int) and n > 0 for n in shape)
