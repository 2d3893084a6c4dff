"""The typed jobs of the legacy API (one per accepted action) and what they produce.

`MalformedFieldError` is the legacy ``400 Bad request.``; each transport (the ``/queue``
answer, ``/results``, the WebSocket channel) encodes a `JobResult` in its own way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable

import torch

from ...errors import InvalidRequestError

BAD_REQUEST_TEXT = "Bad request."


@dataclasses.dataclass(frozen=True)
class Sample:
    """Who asked: the result store key ``"<client ip>-<client_id>"`` and the echoed sample_id."""

    client_key: str
    sample_id: Any

    def to_json(self) -> dict:
        """The fields that start every result object of this sample."""
        return {"client_id": self.client_key, "sample_id": self.sample_id}


@dataclasses.dataclass(frozen=True)
class ForwardJob:
    """A validated ``forward``: one list of ids per row (padding removed)."""

    sample: Sample
    rows: tuple[tuple[int, ...], ...]
    is_batched: bool


@dataclasses.dataclass(frozen=True)
class TokenizeJob:
    """A validated ``tokenize``."""

    sample: Sample
    text: str


@dataclasses.dataclass(frozen=True)
class DetokenizeJob:
    """A validated ``detokenize``."""

    sample: Sample
    input_ids: tuple[int, ...]


Job = ForwardJob | TokenizeJob | DetokenizeJob


@dataclasses.dataclass(frozen=True)
class LogitRows:
    """The raw next-token logits of a forward: one float32 tensor per row."""

    rows: tuple[torch.Tensor, ...]
    is_batched: bool


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What a job produced: its result field (``next_token_logits``, ``input_ids``, ``text`` or
    ``error``) and value (`LogitRows` for a forward, else a JSON value); each transport encodes it."""

    field: str
    value: Any


#: hands a finished job's result to its client (the /queue answer, the result store or a socket)
Deliver = Callable[[Sample, JobResult], Awaitable[None]]


class MalformedFieldError(InvalidRequestError):
    """A field has the wrong type or shape: answered with the legacy text ``Bad request.``.

    The message (what is wrong and how to fix it) goes in the ``X-Error-Detail`` header.
    """
