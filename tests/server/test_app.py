"""The composition root (server/app.py): which routes each API gets, health, metrics, the handle."""

from __future__ import annotations

import pytest
import requests

from lmql_backends.server.app import ServerHandle, make_app, serve
from lmql_backends.server.state import ServerConfig, ServerState

pytestmark = pytest.mark.timeout(120)


def route_paths(app) -> set[str]:
    return {resource.canonical for resource in app.router.resources()}


def test_the_new_api_gets_its_routes_and_none_of_the_legacy_ones(new_server):
    paths = route_paths(make_app(new_server.state))
    assert {"/health", "/metrics", "/v1/completions", "/completions", "/v1/models", "/models"} <= paths
    assert not {"/queue", "/results/{client_id}"} & paths


def test_the_legacy_api_gets_its_routes_and_none_of_the_new_ones(legacy_server):
    paths = route_paths(make_app(legacy_server.state))
    assert {"/health", "/metrics", "/queue", "/results/{client_id}"} <= paths
    assert not {p for p in paths if "completions" in p or "models" in p}


def test_metrics_are_prometheus_gauges(legacy_server):
    text = requests.get(f"http://{legacy_server.endpoint}/metrics", timeout=30).text
    names = [line.split()[0] for line in text.splitlines() if not line.startswith("#")]
    assert "lmql_backends_num_running" in names and "lmql_backends_num_cached_prompt_tokens" in names
    assert all(f"# TYPE {name} gauge" in text for name in names)


def test_health_answers_ok_while_the_engine_runs_and_503_once_it_stopped(tiny_model):
    handle = serve(tiny_model, port=0, legacy=True, background=True)
    try:
        url = f"http://{handle.endpoint}/health"
        assert requests.get(url, timeout=30).json() == {"status": "ok", "model": tiny_model}
        handle.state.engine.stop()
        answer = requests.get(url, timeout=30)
        assert answer.status_code == 503 and answer.json()["status"] == "engine stopped"
    finally:
        handle.stop()


def test_a_second_server_on_a_taken_port_fails_to_start_with_the_bind_error(legacy_server):
    state = legacy_server.state
    taken = ServerConfig(port=legacy_server.port, legacy=True)
    with pytest.raises(OSError):
        ServerHandle(ServerState(state.model_name, state.loaded, state.engine, taken)).start()
