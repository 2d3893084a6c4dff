"""Every exception lmql-backends raises on purpose, in one place.

Hierarchy::

    LmqlBackendsError                 base of everything below
    ├── InvalidRequestError           a request or argument has a bad value (HTTP 400); names it
    │   ├── ContextLengthError        prompt + max_tokens exceed the model's context length
    │   ├── KVCacheLimitError         prompt + max_tokens need more KV memory than --kv-cache-bytes allows
    │   ├── QuerySyntaxError          a query does not parse; carries line and column
    │   ├── RequestTooLargeError      the request body is over the server's limit (HTTP 413)
    │   ├── EndpointNotFoundError     no endpoint has this path (HTTP 404)
    │   └── MethodNotAllowedError     the endpoint exists, not with this method (HTTP 405)
    ├── ModelNotFoundError            a request names a model this server does not serve (HTTP 404)
    ├── AuthenticationError           missing or wrong API key (HTTP 401)
    ├── OverloadedError               the request queue is full (HTTP 429, with Retry-After)
    │   └── KVCacheFullError          the queue is full of requests waiting for KV memory (HTTP 503)
    ├── ModelLoadError                the shared loader could not load a model
    │   └── MissingExtraError         an optional package is missing; says which extra to install
    ├── ConstraintError               constraints cannot be satisfied (no allowed token)
    ├── EngineError                   the engine failed while running a request (HTTP 500)
    │   ├── RequestCancelledError     the request was aborted (client gone, shutdown)
    │   └── UpstreamError             the upstream server (serve-model --upstream) failed (HTTP 502); names it
    │       └── UpstreamUnavailableError  the upstream cannot be reached or is stopping (HTTP 503)
    └── BackendError                  a client could not talk to a server
        ├── BackendUnavailableError   server down or unreachable; names the endpoint and how to start it
        ├── BackendTimeoutError       no answer within chunk_timeout
        └── BackendResponseError      the server answered with an error status
"""

from __future__ import annotations


class LmqlBackendsError(Exception):
    """Base class of every error raised by lmql-backends."""


class InvalidRequestError(LmqlBackendsError, ValueError):
    """A request or argument has a bad value; `param` names it when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


class KVCacheLimitError(InvalidRequestError):
    """A request's KV (prompt plus max_tokens) is larger than the server's ``--kv-cache-bytes`` bound:
    it could never run, even alone; the message names the sizes and the fix."""


class QuerySyntaxError(InvalidRequestError):
    """A query does not parse; `line` and `column` are 1-based."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None):
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(message + where)
        self.line, self.column = line, column


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server's limit (HTTP 413); the message names the limit."""


class EndpointNotFoundError(InvalidRequestError):
    """No endpoint has this path (HTTP 404)."""


class MethodNotAllowedError(InvalidRequestError):
    """The endpoint exists but not with this HTTP method (HTTP 405)."""


class ModelNotFoundError(LmqlBackendsError):
    """A request names a model that this server does not serve."""

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message)
        self.param = param


class AuthenticationError(LmqlBackendsError):
    """The API key is missing or wrong."""


class OverloadedError(LmqlBackendsError):
    """The request queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class KVCacheFullError(OverloadedError):
    """The queue is full and the requests in it wait for KV memory (``--kv-cache-bytes``); retry after
    `retry_after` seconds."""


class ModelLoadError(LmqlBackendsError):
    """The shared loader could not load a model."""


class MissingExtraError(ModelLoadError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class ConstraintError(LmqlBackendsError):
    """The constraints of a query leave no token to choose."""


class EngineError(LmqlBackendsError):
    """The engine failed while running a request."""


class RequestCancelledError(EngineError):
    """The request was aborted before it finished."""


class UpstreamError(EngineError):
    """The upstream a server forwards generation to (``serve-model --upstream``) failed; the message names its address."""


class UpstreamUnavailableError(UpstreamError):
    """The upstream cannot be reached (or is stopping); the message names its address and what to check."""


class BackendError(LmqlBackendsError):
    """A runtime client could not get an answer from a server."""


class BackendUnavailableError(BackendError):
    """The server cannot be reached; the message names the endpoint and how to start it."""


class BackendTimeoutError(BackendError):
    """The server gave no answer within the client's chunk_timeout."""


class BackendResponseError(BackendError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
