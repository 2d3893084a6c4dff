"""Server-sent events: the answer of a streamed completion, one JSON object per event, then ``[DONE]``."""

from __future__ import annotations

import contextlib

import orjson
from aiohttp import web

from ..http import is_disconnected

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class EventStream:
    """A server-sent-events answer to one request: JSON events, then ``[DONE]``."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(headers=SSE_HEADERS)

    async def open(self) -> None:
        """Send the headers."""
        await self.response.prepare(self.request)

    async def send(self, data: dict) -> None:
        """Write one SSE frame; raise ConnectionResetError when the client is gone."""
        if is_disconnected(self.request):
            raise ConnectionResetError("the client closed the connection")
        await self.response.write(b"data: " + orjson.dumps(data) + b"\n\n")

    async def close(self) -> None:
        """Send ``[DONE]`` and end the body (quietly, if the client is gone)."""
        with contextlib.suppress(ConnectionResetError):
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
