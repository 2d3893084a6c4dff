"""Security defaults of both APIs: loopback bind, API key on every endpoint, body limit,
no remote code, legacy results isolated per client.

/health stays open without the key (load balancers probe it, as with vLLM); every other path,
unknown ones included, answers 401 in the API's error format when the key is missing or wrong.
"""

from __future__ import annotations

import asyncio
import inspect
import socket

import aiohttp
import pytest
import requests

import lmql_backends as lmql
from lmql_backends import cli, loader
from lmql_backends.errors import BackendResponseError
from lmql_backends.server import http as server_http
from lmql_backends.server.app import serve
from lmql_backends.server.state import API_KEY_ENV, ServerConfig
from reliability_support import (
    MODEL, base_url, collect_legacy, legacy_error_text, new_client_id, openai_error, start_server,
)

pytestmark = pytest.mark.timeout(180)

KEY = "s3cret-key"
QUERY = '"Hello[WHO]" where len(TOKENS(WHO)) < 4'
NEW_ENDPOINTS = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
    ("GET", "/v1/models", None), ("GET", "/models", None), ("GET", "/metrics", None), ("GET", "/nothing", None),
]
LEGACY_ENDPOINTS = [
    ("POST", "/queue", {"action": "tokenize", "client_id": "c", "sample_id": 1, "text": "Hi"}),
    ("GET", "/results/c", None), ("GET", "/metrics", None), ("GET", "/nothing", None),
]
BAD_HEADERS = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
               {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}]


@pytest.fixture(scope="module")
def new_server():
    handle = start_server(api_key=KEY)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def legacy_server():
    handle = start_server(legacy=True, api_key=KEY)
    yield handle
    handle.stop()


def call(server, method: str, path: str, body, headers: dict) -> requests.Response:
    return requests.request(method, base_url(server) + path, json=body, headers=headers, timeout=60)


# ---- binding ----------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses listening on `port`, from /proc/net (no connection made)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    addresses.add(address)
    return addresses


def test_the_default_bind_address_is_loopback(new_server):
    assert ServerConfig().host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert cli.make_parser().parse_args(["serve-model", MODEL]).host == "127.0.0.1"
    assert listening_addresses(new_server.port) == {"0100007F"}  # 127.0.0.1, little-endian hex


# ---- the API key ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", NEW_ENDPOINTS)
def test_every_new_api_endpoint_needs_the_key(new_server, method, path, body):
    for headers in BAD_HEADERS:
        response = call(new_server, method, path, body, headers)
        assert response.status_code == 401 and openai_error(response)["code"] == "invalid_api_key", headers
    response = call(new_server, method, path, body, {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == (404 if path == "/nothing" else 200), response.text


@pytest.mark.parametrize("method, path, body", LEGACY_ENDPOINTS)
def test_every_legacy_endpoint_needs_the_key(legacy_server, method, path, body):
    for headers in BAD_HEADERS:
        response = call(legacy_server, method, path, body, headers)
        assert response.status_code == 401 and "API key" in legacy_error_text(response), headers
    response = call(legacy_server, method, path, body, {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == (404 if path == "/nothing" else 200), response.text


@pytest.mark.parametrize("server_name", ["new_server", "legacy_server"])
def test_health_stays_open_for_load_balancers(server_name, request):
    response = requests.get(base_url(request.getfixturevalue(server_name)) + "/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def raw_status(port: int, header_line: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header_line + b"\r\nConnection: close\r\n\r\n")
        return int(connection.recv(64).split()[1])


def test_a_key_header_that_is_not_utf8_is_a_401_not_a_crash(new_server):
    assert raw_status(new_server.port, b"Authorization: Bearer \xff\xfe" + KEY.encode()) == 401
    assert raw_status(new_server.port, b"Authorization: Bearer " + KEY.encode()) == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = server_http.hmac.compare_digest
    monkeypatch.setattr(server_http.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert server_http.is_authorized(f"Bearer {KEY}", KEY) and not server_http.is_authorized("Bearer nope", KEY)
    assert compared == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]


def test_the_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    handle = start_server()
    try:
        assert requests.get(base_url(handle) + "/v1/models", timeout=10).status_code == 401
        ok = requests.get(base_url(handle) + "/v1/models", headers={"Authorization": "Bearer from-env"}, timeout=10)
        assert ok.status_code == 200
    finally:
        handle.stop()
    assert cli.make_parser().parse_args(["serve-model", MODEL, "--api-key", "k"]).api_key == "k"


# ---- the runtime's clients send the key -------------------------------------------------------


@pytest.fixture(scope="module")
def reference_result():
    return lmql.run_sync(QUERY)


@pytest.mark.parametrize("server_name, backend", [("new_server", None), ("legacy_server", "legacy")])
def test_runtime_clients_send_the_key_end_to_end(server_name, backend, reference_result, request):
    handle = request.getfixturevalue(server_name)
    decoder = f"argmax(backend={backend!r}, chunk_timeout=30)"
    result = lmql.run_sync(QUERY, model=lmql.model(MODEL, endpoint=handle.endpoint, api_key=KEY), decoder=decoder)
    assert (result.prompt, result.variables) == (reference_result.prompt, reference_result.variables)
    for wrong in ("not-the-key", None):
        with pytest.raises(BackendResponseError, match="API key") as info:
            lmql.run_sync(QUERY, model=lmql.model(MODEL, endpoint=handle.endpoint, api_key=wrong), decoder=decoder)
        assert info.value.status == 401


# ---- body limit -------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_bodies_over_the_limit_are_413_in_the_api_format(legacy):
    handle = start_server(legacy=legacy, max_body_bytes=2048)
    try:
        path = "/queue" if legacy else "/v1/completions"
        big = requests.post(base_url(handle) + path, data=b"{" + b" " * 3000 + b"}", timeout=30)
        assert big.status_code == 413
        message = legacy_error_text(big) if legacy else openai_error(big)["message"]
        assert "2048 bytes" in message and "--max-body-bytes" in message
        small = requests.post(base_url(handle) + path, data=b"{" + b" " * 2000 + b"}", timeout=30)
        assert small.status_code == 400  # read and refused for its content, not its size
    finally:
        handle.stop()
    with pytest.raises(lmql.errors.InvalidRequestError, match="max_body_bytes"):
        ServerConfig(max_body_bytes=0)
    assert cli.make_parser().parse_args(["serve-model", MODEL, "--max-body-bytes", "99"]).max_body_bytes == 99


# ---- no remote code unless asked ----------------------------------------------------------------


def test_trust_remote_code_is_never_passed_unless_asked(monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _real=real, **k: calls.append(k) or _real(*a, **k))
    loader.load_model(str(loader.resolve_model_path(MODEL)))  # another name: a fresh, uncached load
    assert len(calls) == 2 and not any(k.get("trust_remote_code") for k in calls), calls
    assert "trust_remote_code" not in loader.make_from_pretrained_kwargs("x", loader.LoadOptions.make())
    asked = loader.make_from_pretrained_kwargs("x", loader.LoadOptions.make(trust_remote_code=True))
    assert asked["trust_remote_code"] is True
    assert cli.parse_passthrough([]) == {} and cli.parse_passthrough(["--trust-remote-code", "True"]) == {
        "trust_remote_code": True}


# ---- legacy results are isolated per client ---------------------------------------------------


async def post_and_poll(port: int, client_id: str) -> list:
    """Queue a tokenize from 127.0.0.1, then poll the same client id from 127.0.0.2 (another client)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"http://127.0.0.1:{port}"
    body = {"action": "tokenize", "client_id": client_id, "sample_id": "mine", "text": "secret text"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as owner:
        async with owner.post(url + "/queue", json=body) as response:
            assert response.status == 200
    other_address = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(headers=headers, connector=other_address,
                                     timeout=aiohttp.ClientTimeout(total=30)) as other:
        async with other.get(f"{url}/results/{client_id}", params={"wait": "1"}) as response:
            return await response.json()


def test_legacy_results_are_isolated_per_client_address_and_id(legacy_server):
    client_id = new_client_id("iso")
    assert asyncio.run(post_and_poll(legacy_server.port, client_id)) == []  # same id, other address
    headers = {"Authorization": f"Bearer {KEY}"}
    other_id = requests.get(f"{base_url(legacy_server)}/results/{client_id}x", headers=headers, timeout=30).json()
    assert other_id == []
    [result] = collect_legacy(legacy_server, client_id, 1, headers=headers)
    assert result["sample_id"] == "mine" and result["client_id"] == f"127.0.0.1-{client_id}"
