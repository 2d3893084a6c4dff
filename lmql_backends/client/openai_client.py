"""The runtime's client for the new API: `OpenAIClient` talks to ``/v1/completions``.

Token-id exact: prompts are sent as token ids and tokens come back as ``"token_id:N"``
(the ``return_tokens_as_token_ids`` extension), so nothing is re-tokenized. A mask becomes
the ``allowed_token_ids`` extension, which the server applies as a hard mask in the engine,
so the log-probabilities are the same as in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import urllib.parse
from typing import Any, AsyncIterator

import aiohttp
import torch

from ..sampling import SamplingParams
from ..errors import (
    BackendResponseError, BackendTimeoutError, BackendUnavailableError, ConstraintError, InvalidRequestError,
    LmqlBackendsError,
)
from .base import (
    LMClient, TokenChoice, check_chunk_timeout, check_top_k, is_allowed, make_base_url, restrict_to_tokenizer,
)

TOKEN_ID_PATTERN = r"token_id:(\d+)"
SSE_DATA = "data:"
SSE_DONE = "[DONE]"


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    """The body of one ``/v1/completions`` request made by the client."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    allowed_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool = True

    def to_json(self) -> dict[str, Any]:
        """The JSON body, without the fields left at None."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` says about the served model (None where it says nothing)."""

    context_length: int | None = None
    vocab_size: int | None = None


class OpenAIClient(LMClient):
    """An `LMClient` for an lmql-backends server's OpenAI-compatible API (or vLLM).

    One aiohttp session is created lazily in the running event loop and reused (keep-alive).
    Call `aclose()` (or use ``async with``) in that loop when done; a client used from a new
    event loop opens a new session there.
    """

    def __init__(
        self, name: str, endpoint: str, tokenizer, *, api_key: str | None = None, chunk_timeout: float = 30.0
    ):
        self.name = name
        self.tokenizer = tokenizer
        self.base_url = make_base_url(endpoint, drop_suffix="/v1")
        self.api_key = api_key
        self.chunk_timeout = check_chunk_timeout(chunk_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._info: ModelInfo | None = None

    # ---- model facts ---------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """The server's context length (``max_model_len``); known after the first call or `connect`."""
        return self._info.context_length if self._info is not None else None

    async def connect(self) -> ModelInfo:
        """Read ``/v1/models`` once (every other method does this on first use)."""
        if self._info is None:
            try:
                self._info = parse_model_info(await self._get_json("/v1/models"), self.name)
            except BackendResponseError as exc:
                if exc.status != 404:
                    raise
                self._info = ModelInfo()  # a server without /v1/models: nothing is known
        return self._info

    # ---- the LMClient interface ----------------------------------------------------------
    async def generate(self, ids, mask, max_tokens: int, sampling: SamplingParams) -> list[TokenChoice]:
        if max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
        if max_tokens == 0:
            return []
        params = CompletionParams(
            self.name, list(ids), max_tokens, sampling.temperature, sampling.top_p,
            seed=sampling.seed or 0, logprobs=0, stream=True, allowed_token_ids=await self._allowed_ids(mask),
        )
        choices = []
        async with contextlib.aclosing(self._post_stream(params)) as chunks:
            async for chunk in chunks:
                for choice in chunk.get("choices", []):
                    choices.extend(self._token_choices(choice.get("logprobs")))
        return choices

    async def top_tokens(self, ids, mask, k: int) -> list[TokenChoice]:
        check_top_k(k)
        params = CompletionParams(
            self.name, list(ids), 1, temperature=0.0, logprobs=k, allowed_token_ids=await self._allowed_ids(mask),
        )
        logprobs = first_choice(await self._post_json(params)).get("logprobs") or {}
        top = (logprobs.get("top_logprobs") or [None])[0] or {}
        choices = [TokenChoice(self._token_id(name), float(lp)) for name, lp in top.items()]
        # a server may fill top_logprobs with tokens the mask forbids (-inf) when it allows fewer than k (vLLM does)
        allowed = [c for c in choices if math.isfinite(c.logprob) and is_allowed(mask, c.token_id)]
        return sorted(allowed, key=lambda c: -c.logprob)[:k]

    async def score(self, ids, num_context: int) -> list[float]:
        if num_context >= len(ids):
            return []
        if num_context < 1:
            raise InvalidRequestError(
                f"num_context must be >= 1 (the first token has nothing before it), got {num_context}", "num_context"
            )
        await self.connect()
        params = CompletionParams(self.name, list(ids), 0, logprobs=1, echo=True)
        logprobs = first_choice(await self._post_json(params)).get("logprobs") or {}
        scores = logprobs.get("token_logprobs") or []
        if len(scores) < len(ids):
            raise BackendResponseError(f"{self.base_url} returned {len(scores)} prompt logprobs for {len(ids)} tokens")
        return [float(s) for s in scores[num_context:len(ids)]]

    async def aclose(self) -> None:
        """Close the HTTP session (if it belongs to the running event loop)."""
        session, self._session = self._session, None
        if session is not None and not session.closed and self._session_loop is asyncio.get_running_loop():
            await session.close()

    # ---- request helpers -----------------------------------------------------------------
    async def _allowed_ids(self, mask: torch.Tensor | None) -> list[int] | None:
        """The mask as allowed_token_ids; None when it allows every token the model has."""
        info = await self.connect()
        mask = restrict_to_tokenizer(mask, self.num_tokens, info.vocab_size)
        if mask is None:
            return None
        allowed = mask.bool().reshape(-1)
        if not bool(allowed.any()):
            raise ConstraintError("no token is allowed at this step (every token of the mask is false)")
        covers_vocab = info.vocab_size is None or info.vocab_size <= allowed.shape[0]
        if bool(allowed.all()) and covers_vocab:
            return None
        ids = torch.nonzero(allowed).flatten().tolist()
        return [t for t in ids if info.vocab_size is None or t < info.vocab_size]

    def _token_choices(self, logprobs: dict | None) -> list[TokenChoice]:
        if not logprobs:
            return []
        pairs = zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [])
        return [TokenChoice(self._token_id(name), float(lp)) for name, lp in pairs]

    def _token_id(self, name: str) -> int:
        match = re.fullmatch(TOKEN_ID_PATTERN, name) if isinstance(name, str) else None
        if match is None:
            raise BackendResponseError(
                f"{self.base_url} returned the token {name!r} instead of 'token_id:N'; the server must support "
                "the return_tokens_as_token_ids extension (lmql-backends serve-model, or vLLM)"
            )
        return int(match.group(1))

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.chunk_timeout, sock_read=self.chunk_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers())
            self._session_loop = loop
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _get_json(self, path: str) -> dict:
        with self._translate_errors():
            response = await self._wait(self._session_for_loop().get(self.base_url + path))
            async with response:
                await self._check_status(response)
                return await self._wait(response.json(content_type=None))

    async def _post_json(self, params: CompletionParams) -> dict:
        with self._translate_errors():
            async with await self._post(params) as response:
                return await self._wait(response.json(content_type=None))

    async def _post_stream(self, params: CompletionParams) -> AsyncIterator[dict]:
        """The JSON chunks of a streamed completion; raises on an error frame."""
        with self._translate_errors():
            async with await self._post(params) as response:
                async for data in self._sse_payloads(response):
                    if data == SSE_DONE:
                        return
                    yield self._check_chunk(json.loads(data))
                raise BackendResponseError(f"{self.base_url} ended the stream without [DONE]")

    async def _sse_payloads(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        """The ``data:`` payloads of an SSE body, each read within chunk_timeout (no line limit)."""
        pending = b""
        while chunk := await self._wait(response.content.readany()):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                data = parse_sse_line(line)
                if data is not None:
                    yield data

    async def _post(self, params: CompletionParams) -> aiohttp.ClientResponse:
        session = self._session_for_loop()
        response = await self._wait(session.post(self.base_url + "/v1/completions", json=params.to_json()))
        await self._check_status(response)
        return response

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        text = await self._wait(response.text())
        response.release()
        raise BackendResponseError(
            f"{self.base_url} answered HTTP {response.status}: {error_message(text)}", response.status
        )

    def _check_chunk(self, chunk: dict) -> dict:
        if isinstance(chunk, dict) and "error" in chunk:
            raise BackendResponseError(f"{self.base_url} failed during the stream: {error_message(json.dumps(chunk))}")
        return chunk

    async def _wait(self, awaitable):
        """Await with the client's chunk_timeout."""
        return await asyncio.wait_for(awaitable, self.chunk_timeout)

    @contextlib.contextmanager
    def _translate_errors(self):
        """Turn aiohttp and timeout errors into BackendError subclasses naming the endpoint."""
        try:
            yield
        except LmqlBackendsError:
            raise
        except asyncio.TimeoutError:
            raise BackendTimeoutError(
                f"no answer from {self.base_url} within chunk_timeout={self.chunk_timeout} s; the server may be "
                "overloaded or stuck (raise chunk_timeout for slow models)"
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise BackendUnavailableError(
                f"cannot reach the lmql-backends server at {self.base_url} or it dropped the connection ({exc}); "
                f"start it with `lmql-backends serve-model MODEL --port {url_port(self.base_url)}`"
            ) from exc
        except (aiohttp.ClientError, ValueError) as exc:  # bad JSON (a ValueError), bad HTTP
            raise BackendResponseError(f"{self.base_url} sent an answer that cannot be read: {exc}") from exc


def url_port(url: str) -> int:
    parsed = urllib.parse.urlsplit(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def parse_sse_line(line: bytes) -> str | None:
    """The payload of an SSE ``data:`` line, or None for blank lines and other fields."""
    text = line.decode("utf-8").strip()
    if not text.startswith(SSE_DATA):
        return None
    return text[len(SSE_DATA):].strip()


def error_message(text: str) -> str:
    """The message (and code) of an OpenAI error body, or the start of the raw text."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return text.strip()[:500]
    code = f" [{error['code']}]" if error.get("code") else ""
    return f"{error.get('message')}{code}"


def parse_model_info(body: dict, name: str) -> ModelInfo:
    """ModelInfo of `name` (or of the first model) from a ``/v1/models`` body."""
    models = (body.get("data") if isinstance(body, dict) else None) or []
    entry = next((m for m in models if m.get("id") == name), models[0] if models else {})
    return ModelInfo(entry.get("max_model_len"), entry.get("vocab_size"))


def first_choice(body: dict) -> dict:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices:
        raise BackendResponseError(f"the server's answer has no choices: {json.dumps(body)[:300]}")
    return choices[0]
