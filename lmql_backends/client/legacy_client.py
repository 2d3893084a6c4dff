"""The legacy backend client: an `LMClient` over the LMQL 0.0.6.x per-token HTTP API.

It speaks exactly the protocol of ``legacy/PROTOCOL.md``, so it also works against an original
0.0.6.x server: every step POSTs a ``forward`` of the whole sequence and collects the raw
next-token logits from ``/results/<client_id>`` by ``sample_id``. Masking and token choice
happen here, with the same functions the engine uses, so every backend picks the same tokens.

Results are collected by one background task per event loop. It long-polls
(``?wait=SECONDS``) when the server answers with the ``X-Long-Poll: 1`` header, and otherwise
polls every 50 ms like the original client. Any number of samples can be in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import urllib.parse
import uuid
from typing import Any

import aiohttp
import numpy
import orjson
import torch

from ..sampling import SamplingParams, make_mask_processor, select_token
from ..legacy_json import load_json
from ..loader import load_context_length
from ..errors import (
    BackendResponseError, BackendTimeoutError, BackendUnavailableError, InvalidRequestError,
)
from .base import (
    LMClient, TokenChoice, check_chunk_timeout, check_top_k, make_base_url, restrict_to_tokenizer, top_choices,
)

log = logging.getLogger("lmql_backends.client.legacy")

POLL_INTERVAL_SECONDS = 0.05
LONG_POLL_SECONDS = 10.0
#: score() sends one forward per token; at most this many are in flight at once
MAX_SCORE_IN_FLIGHT = 16
LONG_POLL_HEADER = "X-Long-Poll"
ERROR_DETAIL_HEADER = "X-Error-Detail"


@dataclasses.dataclass(eq=False)
class Connection:
    """Per-event-loop state: the HTTP session, samples awaiting results and the collector."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    pending: dict[int, asyncio.Future] = dataclasses.field(default_factory=dict)
    collector: asyncio.Task | None = None


class LegacyTransport:
    """Posts actions to ``/queue`` and routes the results of ``/results`` to waiting futures by sample_id."""

    def __init__(self, base_url: str, model_name: str, api_key: str | None, chunk_timeout: float):
        self.base_url = base_url
        self.model_name = model_name
        self.chunk_timeout = chunk_timeout
        self.client_id = f"lmql-backends-{uuid.uuid4().hex}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.supports_long_poll: bool | None = None  # unknown until the first /results answer
        self._sample_ids = itertools.count()
        self._connection: Connection | None = None

    async def forward(self, ids: list[int]) -> list[float]:
        """The raw next-token logits after `ids` (sent as ``[[...ids]]``, as the original client did)."""
        body = {"action": "forward", "input_ids": [list(ids)], "attention_mask": None, "model_identifier": self.model_name}
        logits = (await self.call(body))["next_token_logits"]
        return logits[0] if logits and isinstance(logits[0], list) else logits

    async def call(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST one action and wait for its result (at most ``chunk_timeout`` seconds)."""
        connection = self._current_connection()
        sample_id = next(self._sample_ids)
        future = connection.loop.create_future()
        connection.pending[sample_id] = future
        body = {**body, "sample_id": sample_id, "client_id": self.client_id}
        try:
            self._ensure_collector(connection)
            await self._post(connection, body)
            self._ensure_collector(connection)  # a collector that found nothing pending may have ended
            return await self._wait_for(future, sample_id)
        finally:
            connection.pending.pop(sample_id, None)
            forget(future)

    async def _wait_for(self, future: asyncio.Future, sample_id: int) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(future, self.chunk_timeout)
        except TimeoutError:
            raise BackendTimeoutError(
                f"the legacy server at {self.base_url} sent no result for sample {sample_id} "
                f"within chunk_timeout={self.chunk_timeout} s"
            ) from None

    async def _post(self, connection: Connection, body: dict[str, Any]) -> None:
        """POST the action to /queue; a refusal raises the server's error."""
        async with translating_errors(self):
            async with connection.session.post(
                self.base_url + "/queue", data=orjson.dumps(body), timeout=aiohttp.ClientTimeout(total=self.chunk_timeout),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    detail = resp.headers.get(ERROR_DETAIL_HEADER)
                    raise self.response_error(resp.status, await resp.text(), detail)
                await resp.read()

    def _waiting(self, is_waiting: bool) -> tuple[dict[str, str] | None, aiohttp.ClientTimeout]:
        """The ``?wait=`` of a request the server may hold (None: do not ask), and its HTTP timeout."""
        wait = min(LONG_POLL_SECONDS, self.chunk_timeout)
        return ({"wait": f"{wait:g}"} if is_waiting else None), aiohttp.ClientTimeout(total=wait + self.chunk_timeout)

    def response_error(self, status: int, text: str, detail: str | None = None) -> BackendResponseError:
        """The server's error text, plus the X-Error-Detail of a ``Bad request.`` (an extension)."""
        message = f"the legacy server at {self.base_url} answered HTTP {status}: {text.strip()}"
        return BackendResponseError(message + (f" ({detail})" if detail else ""), status)

    # ---- collecting results ---------------------------------------------------------------
    def _ensure_collector(self, connection: Connection) -> None:
        if connection.collector is None or connection.collector.done():
            connection.collector = connection.loop.create_task(self._collect(connection))

    async def _collect(self, connection: Connection) -> None:
        """Fetch results while samples are pending; route each to its future by sample_id."""
        try:
            while has_waiters(connection.pending):
                for result in await self._fetch_results(connection):
                    self._deliver(connection, result)
                if not self.supports_long_poll and has_waiters(connection.pending):
                    await asyncio.sleep(POLL_INTERVAL_SECONDS)
        except Exception as exc:  # the server went away or answered garbage: fail every waiter
            fail_all(connection.pending, exc)

    async def _fetch_results(self, connection: Connection) -> list[dict[str, Any]]:
        url = f"{self.base_url}/results/{urllib.parse.quote(self.client_id, safe='')}"
        params, timeout = self._waiting(self.supports_long_poll is not False)
        async with translating_errors(self):
            async with connection.session.get(url, params=params, timeout=timeout) as resp:
                if resp.status != 200:
                    raise self.response_error(resp.status, await resp.text())
                self.supports_long_poll = resp.headers.get(LONG_POLL_HEADER) == "1"
                results = load_json(await resp.read())
        if not isinstance(results, list):
            raise BackendResponseError(f"the legacy server at {self.base_url} sent results that are not a list")
        return results

    def _deliver(self, connection: Connection, result: dict[str, Any]) -> None:
        sample_id = result.get("sample_id") if isinstance(result, dict) else None
        future = connection.pending.get(sample_id) if isinstance(sample_id, int) else None
        if future is None or future.done():
            return  # a sample that already timed out, or not ours
        try:
            future.set_result(self.checked(result))
        except BackendResponseError as exc:
            future.set_exception(exc)

    def checked(self, result: dict[str, Any]) -> dict[str, Any]:
        """`result`, or the BackendResponseError of an error result."""
        if "error" in result:
            raise BackendResponseError(
                f"the legacy server at {self.base_url} failed on sample {result.get('sample_id')}: {result['error']}"
            )
        return result

    # ---- the connection of the running loop ------------------------------------------------
    def _current_connection(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self._connection is None or self._connection.loop is not loop:
            self._connection = Connection(loop, self._make_session())
        return self._connection

    def _make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers=self.headers, connector=aiohttp.TCPConnector(limit=64))

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or connection.loop is not asyncio.get_running_loop():
            return
        if connection.collector is not None:
            connection.collector.cancel()
            await asyncio.gather(connection.collector, return_exceptions=True)
        await connection.session.close()


def has_waiters(pending: dict[int, asyncio.Future]) -> bool:
    return any(not future.done() for future in pending.values())


def forget(future: asyncio.Future) -> None:
    """Drop a future nobody awaits any more, without an "exception never retrieved" warning."""
    if future.done() and not future.cancelled():
        future.exception()
    future.cancel()


def fail_all(pending: dict[int, asyncio.Future], exc: Exception) -> None:
    for future in pending.values():
        if not future.done():
            future.set_exception(exc)


@contextlib.asynccontextmanager
async def translating_errors(transport: LegacyTransport):
    """Turn aiohttp failures into BackendUnavailableError / BackendTimeoutError naming the endpoint."""
    try:
        yield
    except (BackendResponseError, BackendTimeoutError, BackendUnavailableError):
        raise
    except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
        raise BackendTimeoutError(
            f"the legacy server at {transport.base_url} did not answer within "
            f"chunk_timeout={transport.chunk_timeout} s"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise BackendUnavailableError(unavailable_message(transport, exc)) from exc
    except aiohttp.ClientError as exc:
        message = f"the connection to the legacy server at {transport.base_url} failed: {exc}"
        raise BackendUnavailableError(message) from exc
    except ValueError as exc:
        raise BackendResponseError(f"the legacy server at {transport.base_url} sent invalid JSON: {exc}") from exc


def unavailable_message(transport: LegacyTransport, exc: Exception) -> str:
    port = urllib.parse.urlsplit(transport.base_url).port or 8080
    return (
        f"cannot reach the legacy LMQL server at {transport.base_url} ({exc}); start it with "
        f"`lmql-backends serve-model {transport.model_name} --legacy --port {port}`"
    )


class LegacyClient(LMClient):
    """Runs queries against a legacy (LMQL 0.0.6.x protocol) server, one token per call."""

    def __init__(
        self, name: str, endpoint: str, tokenizer, *, api_key: str | None = None, chunk_timeout: float = 30.0,
    ):
        self.name = name
        self.tokenizer = tokenizer
        self.context_length = load_context_length(name)
        self.endpoint = make_base_url(endpoint)
        self.transport = LegacyTransport(self.endpoint, name, api_key, check_chunk_timeout(chunk_timeout))

    async def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """The raw next-token logits after `ids`, as float32 (exactly what the server computed)."""
        if not ids:
            raise InvalidRequestError("ids is empty; send at least one token id (the decoder puts BOS first)", "ids")
        # numpy converts a list of floats faster than torch.tensor does
        return torch.from_numpy(numpy.asarray(await self.transport.forward(ids), dtype=numpy.float32))

    async def generate(self, ids, mask, max_tokens: int, sampling: SamplingParams) -> list[TokenChoice]:
        """ONE token per call: mask the logits here and choose exactly as the engine does."""
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be an integer >= 0, got {max_tokens!r}", "max_tokens")
        if max_tokens == 0:
            return []
        logits = await self.next_token_logits(ids)
        mask = restrict_to_tokenizer(mask, self.num_tokens, logits.shape[-1])
        if mask is not None:
            logits = make_mask_processor(mask)(ids, logits)
        token, logprobs = select_token(logits, sampling, len(ids))
        return [TokenChoice(token, float(logprobs[token]))]

    async def top_tokens(self, ids, mask, k: int) -> list[TokenChoice]:
        check_top_k(k)
        return top_choices(await self.next_token_logits(ids), mask, k, self.num_tokens)

    async def score(self, ids, num_context: int) -> list[float]:
        """One forward per scored token, issued concurrently; the raw log_softmax of each."""
        if not 1 <= num_context:
            raise InvalidRequestError(f"num_context must be >= 1 (the first token has no context), got {num_context}")
        in_flight = asyncio.Semaphore(MAX_SCORE_IN_FLIGHT)

        async def score_position(i: int) -> float:
            async with in_flight:
                logits = await self.next_token_logits(list(ids[:i]))
            return float(torch.log_softmax(logits, dim=-1)[ids[i]])

        return list(await asyncio.gather(*(score_position(i) for i in range(num_context, len(ids)))))

    async def aclose(self) -> None:
        await self.transport.aclose()
