"""lmql-backends' own extensions of the frozen legacy protocol (``legacy/PROTOCOL.md``, "Extensions").

An original client never sees them: the headers by which a client learns what this server
offers, and the ``?wait=`` of a long-polled ``/results`` request.
"""

from __future__ import annotations

import math

from .jobs import MalformedFieldError

MAX_WAIT_SECONDS = 30.0
#: on every /results answer: this server long-polls ``?wait=`` (extensions 5, 6)
LONG_POLL_HEADER = "X-Long-Poll"
#: on every ``400 Bad request.``: what is wrong and how to fix it (extension 3)
ERROR_DETAIL_HEADER = "X-Error-Detail"


def parse_wait(text: str | None) -> float:
    """Seconds to wait for a first result (``?wait=`` on /results), at most MAX_WAIT_SECONDS."""
    if text is None:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise MalformedFieldError(f"wait must be a number of seconds >= 0, got {text!r}")
    return min(seconds, MAX_WAIT_SECONDS)
