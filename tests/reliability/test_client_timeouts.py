"""Every wait of both runtime clients is bounded: a server that stalls at any point of any call
makes the client raise `BackendTimeoutError` (naming the endpoint) instead of hanging.

The stalling servers are small aiohttp apps on loopback standing in for a stuck server; each
test is bounded by pytest-timeout and by an outer ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.client.openai_client import OpenAIClient
from lmql_backends.engine import SamplingParams
from lmql_backends.errors import BackendTimeoutError
from lmql_backends.loader import load_tokenizer
from reliability_support import MODEL

pytestmark = pytest.mark.timeout(60)

CHUNK_TIMEOUT = 0.5
OUTER_BOUND = 20
MODELS_BODY = {"object": "list", "data": [{"id": MODEL, "max_model_len": 1024, "vocab_size": 2048}]}
CHUNK = {"id": "c", "object": "text_completion", "created": 0, "model": MODEL,
         "choices": [{"text": "a", "index": 0, "finish_reason": None,
                      "logprobs": {"tokens": ["token_id:5"], "token_logprobs": [-1.0], "top_logprobs": [{}],
                                   "text_offset": [0]}}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


async def stall(request: web.Request):
    await asyncio.sleep(3600)


async def models(request: web.Request):
    return web.json_response(MODELS_BODY)


async def headers_then_stall(request: web.Request):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
    await asyncio.sleep(3600)


async def half_a_json_body(request: web.Request):
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b'{"choices": [')
    await asyncio.sleep(3600)


async def accept_sample(request: web.Request):
    return web.json_response({"sample_id": (await request.json())["sample_id"]})


async def no_results_yet(request: web.Request):
    await asyncio.sleep(min(float(request.query.get("wait", 0)), 0.1))
    return web.json_response([], headers={"X-Long-Poll": "1"})


async def start_stub(routes: dict[tuple[str, str], object]) -> tuple[web.AppRunner, str]:
    """A loopback server with these (method, path) -> handler routes."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


OPENAI_STALLS = {
    "models never answers": {("GET", "/v1/models"): stall},
    "completion never answers": {("GET", "/v1/models"): models, ("POST", "/v1/completions"): stall},
    "stream stalls after a chunk": {("GET", "/v1/models"): models, ("POST", "/v1/completions"): headers_then_stall},
    "json body stalls": {("GET", "/v1/models"): models, ("POST", "/v1/completions"): half_a_json_body},
}
OPENAI_CALLS = {
    "generate": lambda c: c.generate([0, 5], None, 3, SamplingParams(temperature=0)),
    "top_tokens": lambda c: c.top_tokens([0, 5], None, 2),
    "score": lambda c: c.score([0, 5, 6], 1),
}


LEGACY_STALLS = {
    "queue never answers": {("POST", "/queue"): stall},
    "results never answer": {("POST", "/queue"): accept_sample, ("GET", "/results/{client_id}"): stall},
    "result never arrives": {("POST", "/queue"): accept_sample, ("GET", "/results/{client_id}"): no_results_yet},
}
LEGACY_CALLS = {
    "generate": lambda c: c.generate([0, 5], None, 3, SamplingParams(temperature=0)),
    "top_tokens": lambda c: c.top_tokens([0, 5], None, 2),
    "score": lambda c: c.score([0, 5, 6, 7], 1),
}


BACKENDS = {
    "openai": (OpenAIClient, OPENAI_STALLS, OPENAI_CALLS),
    "legacy": (LegacyClient, LEGACY_STALLS, LEGACY_CALLS),
}
CASES = [
    (backend, stall, call)
    for backend, (_, stalls, calls) in BACKENDS.items() for stall in sorted(stalls) for call in sorted(calls)
]


@pytest.mark.parametrize("backend, stall_name, call_name", CASES)
async def test_client_never_hangs(tokenizer, backend, stall_name, call_name):
    client_class, stalls, calls = BACKENDS[backend]
    runner, endpoint = await start_stub(stalls[stall_name])
    try:
        async with client_class(MODEL, endpoint, tokenizer, chunk_timeout=CHUNK_TIMEOUT) as client:
            with pytest.raises(BackendTimeoutError) as info:
                await asyncio.wait_for(calls[call_name](client), OUTER_BOUND)
        assert endpoint in str(info.value)
    finally:
        await runner.cleanup()
