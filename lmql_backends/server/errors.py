"""The one table mapping exceptions to HTTP status codes and OpenAI-style error bodies."""

from __future__ import annotations

from ..errors import (
    AuthenticationError, ConstraintError, ContextLengthError, EndpointNotFoundError, EngineError,
    InvalidRequestError, KVCacheFullError, KVCacheLimitError, MethodNotAllowedError, ModelNotFoundError, OverloadedError,
    RequestCancelledError, RequestTooLargeError, UpstreamError, UpstreamUnavailableError,
)


# (exception class, HTTP status, OpenAI error type, OpenAI error code); first match wins.
ERROR_TABLE = [
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (EndpointNotFoundError, 404, "invalid_request_error", "not_found"),
    (MethodNotAllowedError, 405, "invalid_request_error", "method_not_allowed"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (KVCacheLimitError, 400, "invalid_request_error", "kv_cache_exceeded"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (ConstraintError, 400, "invalid_request_error", "unsatisfiable_constraints"),
    (AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (KVCacheFullError, 503, "server_error", "kv_cache_full"),
    (OverloadedError, 429, "rate_limit_error", "queue_full"),
    (UpstreamUnavailableError, 503, "server_error", "upstream_unavailable"),
    (UpstreamError, 502, "server_error", "upstream_error"),
    (RequestCancelledError, 503, "server_error", "request_cancelled"),
    (EngineError, 500, "server_error", "engine_error"),
]


def classify(exc: BaseException) -> tuple[int, str, str | None]:
    """HTTP status, error type and code for `exc` (unknown exceptions are 500 server errors)."""
    for cls, status, kind, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", None


def error_message(exc: BaseException) -> str:
    """The message of `exc` (its class name if it has none), encodable as UTF-8 whatever it echoes:
    characters UTF-8 cannot encode (lone surrogates from JSON ``\\ud800`` escapes) become ``\\ud800``."""
    text = str(exc) or type(exc).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def openai_error_body(exc: BaseException) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` for `exc`."""
    _, kind, code = classify(exc)
    return {"error": {"message": error_message(exc), "type": kind, "param": getattr(exc, "param", None), "code": code}}


def error_headers(exc: BaseException) -> dict[str, str]:
    """Extra headers: Retry-After for overload (429 and 503 kv_cache_full)."""
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(max(1, round(exc.retry_after)))}
    return {}
