"""The lmql-backends command: pass-through flags, and serve-model as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from lmql_backends.cli import main, make_parser, parse_byte_size, parse_passthrough
from lmql_backends.errors import InvalidRequestError

EOS_TEXT = "<|endoftext|>"  # the embedded tiny model's EOS token


def test_passthrough_flags_are_typed():
    extra = ["--trust_remote_code", "True", "--max_memory", '{"0": "20GiB"}', "--revision=main", "--top-k", "3"]
    assert parse_passthrough(extra) == {
        "trust_remote_code": True, "max_memory": {"0": "20GiB"}, "revision": "main", "top_k": 3,
    }


def test_passthrough_flag_without_value_is_an_error_naming_it():
    with pytest.raises(InvalidRequestError, match="--trust_remote_code"):
        parse_passthrough(["--trust_remote_code"])


@pytest.mark.parametrize("text, size", [
    ("1073741824", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("4G", 4 * 2**30),
    ("64k", 64 * 2**10), ("100kB", 100_000), (" 3 mib ", 3 * 2**20), ("7b", 7),
])
def test_kv_cache_bytes_takes_integers_and_sizes_with_units(text, size):
    assert parse_byte_size(text) == size
    args = make_parser().parse_args(["serve-model", "builtin:tiny", "--kv-cache-bytes", text])
    assert args.kv_cache_bytes == size


def test_kv_cache_bytes_defaults_to_no_bound():
    assert make_parser().parse_args(["serve-model", "builtin:tiny"]).kv_cache_bytes is None


@pytest.mark.parametrize("text", ["12XB", "", "-5MiB", "0", "0.1B", "GiB", "1e9", "2 GB extra"])
def test_a_bad_kv_cache_bytes_is_a_cli_error_naming_the_value_and_the_accepted_forms(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_parser().parse_args(["serve-model", "builtin:tiny", f"--kv-cache-bytes={text}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-bytes" in err and repr(text) in err and "MiB" in err and "GB" in err


def test_kv_cache_bytes_with_upstream_is_an_error_before_anything_loads(capsys):
    code = main(["serve-model", "builtin:tiny", "--kv-cache-bytes", "1GiB", "--upstream", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-bytes" in err and "--upstream" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-model exited early: {process.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"serve-model did not open port {port}")


@pytest.fixture
def serve_model(tiny_model):
    """Start `lmql-backends serve-model` in a subprocess; yields (port, process); stops it."""
    processes = []

    def start(*flags):
        port = free_port()
        cmd = [sys.executable, "-m", "lmql_backends.cli", "serve-model", tiny_model, "--port", str(port), *flags]
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        wait_for_port(port, process)
        return port, process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.timeout(180)
def test_serve_model_streams_openai_chunks_ending_in_done(serve_model, tiny_model):
    port, process = serve_model()
    body = {"model": tiny_model, "prompt": "Hello", "max_tokens": 5, "stream": True, "logprobs": 3}
    with requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    tokens = [token for c in chunks if c["choices"] for token in c["choices"][0]["logprobs"]["tokens"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    # temperature defaults to 1 (as OpenAI), so a sampled EOS (listed as the last token, as OpenAI
    # lists <|endoftext|>) may end the stream with "stop", at the 5th token too
    is_stopped_by_eos = finish == "stop" and tokens[-1] == EOS_TEXT and len(tokens) <= 5
    assert (len(tokens), finish) == (5, "length") or is_stopped_by_eos, (tokens, finish)
    assert all(c["object"] == "text_completion" for c in chunks)
    # as OpenAI: the k most likely tokens, plus the sampled one when it is not among them
    assert all(len(c["choices"][0]["logprobs"]["top_logprobs"][0]) in (3, 4) for c in chunks if c["choices"])
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(180)
def test_serve_model_legacy_forward_then_results(serve_model, tiny_model):
    port, process = serve_model("--legacy")
    from transformers import AutoTokenizer

    from lmql_backends.models import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    ids = [tokenizer.bos_token_id, *tokenizer("Hello", add_special_tokens=False).input_ids]
    body = {"action": "forward", "input_ids": [ids], "attention_mask": None,
            "model_identifier": tiny_model, "client_id": "cli-test", "sample_id": 7}
    queued = requests.post(f"http://127.0.0.1:{port}/queue", json=body, timeout=30)
    assert queued.status_code == 200 and queued.json() == {"sample_id": 7}
    results, deadline = [], time.monotonic() + 30
    while not results and time.monotonic() < deadline:
        results = requests.get(f"http://127.0.0.1:{port}/results/cli-test", timeout=30).json()
        time.sleep(0.05)
    assert results[0]["sample_id"] == 7
    logits = results[0]["next_token_logits"]
    assert len(logits) == 1 and len(logits[0]) >= len(tokenizer)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(120)
def test_cuda_flag_without_gpu_warns_and_serves(serve_model):
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    port, process = serve_model("--cuda")
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert "no GPU is available" in output
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == env_before


def metric_values(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    pairs = (line.split() for line in text.splitlines() if line.startswith("lmql_backends_"))
    return {name: float(value) for name, value in pairs}


@pytest.mark.timeout(180)
def test_threads_model_impl_matmul_and_kv_cache_bytes_flags_reach_the_server(serve_model):
    port, process = serve_model("--legacy", "--threads", "3", "--model-impl", "transformers")
    deadline = time.monotonic() + 30
    while metric_values(port)["lmql_backends_num_threads"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # set by the engine thread as it starts
    metrics = metric_values(port)
    assert metrics["lmql_backends_num_threads"] == 3
    assert metrics["lmql_backends_is_native_forward"] == 0
    assert metrics["lmql_backends_kv_limit_bytes"] == 0
    other_port, other = serve_model("--legacy", "--matmul", "onednn", "--kv-cache-bytes", "64MiB")
    other_metrics = metric_values(other_port)
    assert other_metrics["lmql_backends_is_native_forward"] == 1
    assert other_metrics["lmql_backends_kv_limit_bytes"] == 64 * 2**20
    assert other_metrics["lmql_backends_num_onednn_linears"] == 4 * 4 + 1  # 4 per block and the LM head
    for server in (process, other):
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def engine_workers(process: subprocess.Popen) -> list[int]:
    """Pids of the engine processes the server `process` started."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"lmql_backends.engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags, has_worker", [
    ((), True), (("--no-engine-process",), False), (("--legacy",), False), (("--legacy", "--engine-process"), True),
])
def test_engine_process_flag_and_default(serve_model, flags, has_worker):
    port, process = serve_model(*flags)
    workers = engine_workers(process)
    assert len(workers) == (1 if has_worker else 0)
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    for pid in workers:  # the engine process ended (and was reaped) before its server exited
        assert not Path(f"/proc/{pid}").exists()
