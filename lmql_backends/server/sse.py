"""Server-sent events: a streamed answer, one JSON object per event (streamed completions end with ``[DONE]``)."""

from __future__ import annotations

import contextlib

import orjson
from aiohttp import web

from .http import is_disconnected

#: X-Accel-Buffering: proxies such as nginx pass each event on as it comes
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream:
    """A server-sent-events answer to one request: JSON events, then ``[DONE]``."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(headers=SSE_HEADERS)

    async def open(self) -> None:
        """Send the headers."""
        await self.response.prepare(self.request)

    async def send(self, data: dict, event: str | None = None) -> None:
        """Write one SSE frame (named `event` if given); raise ConnectionResetError when the client is gone."""
        if is_disconnected(self.request):
            raise ConnectionResetError("the client closed the connection")
        name = b"" if event is None else b"event: " + event.encode() + b"\n"
        await self.response.write(name + b"data: " + orjson.dumps(data) + b"\n\n")

    async def close(self) -> None:
        """Send ``[DONE]`` and end the body (quietly, if the client is gone)."""
        with contextlib.suppress(ConnectionResetError):
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
