"""HTTP helpers every protocol uses: the body, error responses, and the auth and error middlewares.

Error responses are safe for any text: a message that echoes user input holding lone
surrogates (JSON's ``"\\ud800"``) is sent with those characters escaped, never as a 500.
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from ..errors import (
    AuthenticationError, EndpointNotFoundError, InvalidRequestError, MethodNotAllowedError, RequestTooLargeError,
)
from .errors import classify, error_headers, error_message, openai_error_body
from .state import ServerConfig, ServerState, get_state

log = logging.getLogger("lmql_backends.server")

#: paths answered without an API key (load balancers probe them), as vLLM does
OPEN_PATHS = frozenset({"/health"})
#: paths where the key may also come as ``?api_key=KEY``: the LMTP WebSocket (LMQL's client sends no header)
QUERY_KEY_PATHS = frozenset({"/"})
#: the playground page and its files (a navigating browser sends no key; the page sends it with queries)
OPEN_PREFIXES = ("/playground/", )


async def read_body(request: web.Request) -> bytes:
    """The whole request body; RequestTooLargeError (413) when it is over --max-body-bytes."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(get_state(request).config.max_body_bytes) from None


def body_too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"the request body is larger than this server's limit of {limit} bytes; send a smaller request, "
        f"or start the server with a larger --max-body-bytes"
    )


def is_disconnected(request: web.Request) -> bool:
    """Whether the client has closed the connection (nobody will read the answer)."""
    return request.transport is None or request.transport.is_closing()


# ---- error responses ---------------------------------------------------------------------


def json_error(exc: BaseException) -> web.Response:
    """An OpenAI-style error response for `exc`, with the status from the error table."""
    status, _, _ = classify(exc)
    return web.json_response(openai_error_body(exc), status=status, headers=error_headers(exc))


def text_error(exc: BaseException) -> web.Response:
    """A legacy-API error response: the message of `exc` as ``text/plain``, status from the error table."""
    status, _, _ = classify(exc)
    return text_response(error_message(exc), error_headers(exc), status)


def text_response(text: str, headers: dict[str, str] | None = None, status: int = 400) -> web.Response:
    """A ``text/plain`` response; characters UTF-8 cannot encode (lone surrogates) are escaped."""
    body = text.encode("utf-8", "backslashreplace")
    return web.Response(body=body, status=status, content_type="text/plain", headers=headers)


def header_safe(text: str) -> str:
    """`text` as one line of printable ASCII (at most 1000 characters), fit for a header value."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", " ").replace("\r", " ")[:1000]


def error_response(state: ServerState, exc: BaseException) -> web.Response:
    """`exc` in the format of the API this server speaks (text on the legacy API, JSON otherwise)."""
    return text_error(exc) if state.config.legacy else json_error(exc)


def from_http_exception(exc: web.HTTPException, config: ServerConfig) -> Exception | None:
    """Our typed error for aiohttp's 404, 405, 413 and 400 (None for the others: aiohttp answers them)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return body_too_large(config.max_body_bytes)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowedError(f"this endpoint does not answer {exc.method}; use {allowed}")
    if isinstance(exc, web.HTTPNotFound):
        return EndpointNotFoundError("no endpoint has this path; see docs/new-api.md for the endpoints")
    if isinstance(exc, web.HTTPBadRequest):
        return InvalidRequestError(exc.text or exc.reason)
    return None


# ---- middlewares -------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error that escapes a handler (aiohttp's own 404/405/413 too) in the API's format."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        error = from_http_exception(exc, get_state(request).config)
        if error is None:
            raise
        return error_response(get_state(request), error)
    except Exception as exc:  # a bug: log it, answer a 500 in the API's format
        log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=exc)
        return error_response(get_state(request), exc)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Every path but /health needs ``Authorization: Bearer <key>`` when the server has a key."""
    expected = get_state(request).config.api_key
    is_open = not expected or request.path in OPEN_PATHS or is_page(request.path)
    if not is_open and not is_authorized(request.headers.get("Authorization", ""), expected) \
            and not is_query_key_valid(request, expected):
        exc = AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        return error_response(get_state(request), exc)
    return await handler(request)


def is_query_key_valid(request: web.Request, expected: str) -> bool:
    """Constant-time check of ``?api_key=KEY`` on the paths that take it (QUERY_KEY_PATHS)."""
    sent = request.query.get("api_key", "")
    return request.path in QUERY_KEY_PATHS and hmac.compare_digest(sent.encode("utf-8", "surrogateescape"),
                                                                    expected.encode())


def is_page(path: str) -> bool:
    return path == "/playground" or path.startswith(OPEN_PREFIXES)


def is_authorized(header: str, expected: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header."""
    scheme, _, key = header.partition(" ")
    sent = key.strip().encode("utf-8", "surrogateescape")  # headers that are not UTF-8 arrive escaped
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, expected.encode())
