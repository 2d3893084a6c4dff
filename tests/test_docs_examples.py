"""Every example of LMQL's "Local Models / Transformers" chapter, run for real (issue 8).

The examples are typed as in the LMQL documentation, with ``gpt2`` / ``gpt2-medium`` replaced by the
embedded model ``builtin:tiny`` and ``lmql serve-model`` by ``lmql-backends serve-model``; inside a
query ``lmql.`` means lmql_backends. Servers run as real subprocesses on loopback, on the ports of
the examples (8080, 9999) when those are free.

The examples' queries have no length constraint, so on the embedded model (which rarely writes its
end-of-text token) they would generate up to the 1024-token context. To keep this file fast, every
query text stays verbatim but the call passes ``decoder=argmax(max_len=MAX_LEN, ...)`` with the
same decoder arguments as the query's own decoder clause; example 3 is also run once uncapped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmql_backends
from lmql_backends.runtime import DecoderSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:tiny"
MAX_LEN = 32
DEFAULT_PORT = 8080
EXAMPLE_PORT = 9999
CUDA_WARNING = "no GPU is available"
LOAD_SUMMARY = f"loaded {MODEL}:"
HAS_GPU = torch.cuda.is_available()

# cuda=True in this process warns on the first load only; the servers' one-line warning is asserted below
pytestmark = pytest.mark.filterwarnings(f"ignore:.*{CUDA_WARNING}")

HELLO_INPROCESS = 'argmax "Hello[WHO]" from "local:builtin:tiny"'
CONSTRAINED_INPROCESS = r'argmax "Hello[WHO]" from "local:builtin:tiny" where STOPS_AT(WHO, "\n") and len(TOKENS(WHO)) < 10'


# ---- helpers: ports, subprocess servers, result checks ------------------------------------------

def capped(**arguments) -> DecoderSpec:
    """argmax with the query's own decoder arguments, stopping after MAX_LEN tokens in all."""
    return lmql_backends.argmax(max_len=MAX_LEN, **arguments)


def is_port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_or_free(preferred: int) -> int:
    """The example's port when it is free, else any free loopback port."""
    return preferred if is_port_free(preferred) else free_port()


def lmql_backends_command() -> list[str]:
    """The ``lmql-backends`` console script of this interpreter, else ``python -m lmql_backends.cli``."""
    script = Path(sys.executable).parent / "lmql-backends"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmql_backends.cli"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment plus `extra`, with the repository importable."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclasses.dataclass
class ServerProcess:
    """A server started as a subprocess, its port, and the file its output goes to."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output}")
            if is_accepting(self.port):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the server did not open port {self.port} within {timeout} s:\n{self.output}")

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed if it does not stop within 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)


def is_accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def launch(tmp_path):
    """Start a server subprocess: ``launch(argv, port, **env)``; every one is stopped afterwards."""
    started: list[ServerProcess] = []

    def start(argv: list[str], port: int, **env: str) -> ServerProcess:
        log_path = tmp_path / f"server-{len(started)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=subprocess_env(**env)
            )
        started.append(ServerProcess(process, port, log_path))
        return started[-1].wait_ready()

    yield start
    for server in started:
        server.stop()


def serve_model(launch, *flags: str, port: int | None = None, **env: str) -> ServerProcess:
    """``lmql-backends serve-model builtin:tiny FLAGS`` (``--port`` added when `port` is given)."""
    port_flags = [] if port is None else ["--port", str(port)]
    return launch([*lmql_backends_command(), "serve-model", MODEL, *flags, *port_flags], port or DEFAULT_PORT, **env)


def model_clause(port: int) -> str:
    """The query's ``from`` target for a server on `port`: the bare name on the default port."""
    return f'"{MODEL}"' if port == DEFAULT_PORT else f'lmql.model("{MODEL}", endpoint="localhost:{port}")'


def assert_same_hello(result, reference) -> None:
    assert result.prompt.startswith("Hello")
    assert result.variables["WHO"] != ""
    assert result.prompt == "Hello" + result.variables["WHO"]
    assert (result.prompt, result.variables) == (reference.prompt, reference.variables)


def assert_cpu_fallback_warned_once(output: str) -> None:
    """--cuda without a GPU: one ``warning: ...`` line, and the model on the CPU."""
    if HAS_GPU:
        assert CUDA_WARNING not in output
        return
    lines = [line for line in output.splitlines() if CUDA_WARNING in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "device cpu" in load_summary(output)


def load_summary(output: str) -> str:
    """The one load summary line a server prints."""
    lines = [line for line in output.splitlines() if line.startswith(LOAD_SUMMARY)]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def hello_reference():
    """``argmax "Hello[WHO]"`` in-process: the value every backend must reproduce."""
    return lmql_backends.run_sync(HELLO_INPROCESS, decoder=capped())


# ---- 1. serve-model with --cuda, query on the default port 8080 ----------------------------------

@pytest.mark.timeout(150)
def test_example1_serve_model_cuda_and_query_default_port(launch, hello_reference):
    if not is_port_free(DEFAULT_PORT):
        pytest.skip("port 8080 busy")
    server = serve_model(launch, "--cuda")  # lmql-backends serve-model builtin:tiny --cuda
    result = lmql_backends.run_sync('argmax "Hello[WHO]" from "builtin:tiny"', decoder=capped())
    assert_same_hello(result, hello_reference)
    assert server.stop() == 0
    assert_cpu_fallback_warned_once(server.output)


# ---- 2. serve-model on port 9999 with a from_pretrained flag, lmql.model(endpoint=...) -----------

@pytest.mark.timeout(150)
def test_example2_custom_port_and_from_pretrained_flag(launch, hello_reference):
    port = port_or_free(EXAMPLE_PORT)
    server = serve_model(launch, "--cuda", "--trust_remote_code", "True", port=port)
    query = f'argmax "Hello[WHO]" from lmql.model("builtin:tiny", endpoint="localhost:{port}")'
    assert_same_hello(lmql_backends.run_sync(query, decoder=capped()), hello_reference)
    assert server.stop() == 0
    assert_cpu_fallback_warned_once(server.output)


# ---- 3. in-process: lmql.model("local:...") and "local:..." --------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("query", [
    'argmax "Hello[WHO]" from lmql.model("local:builtin:tiny")',
    'argmax "Hello[WHO]" from "local:builtin:tiny"',
])
def test_example3_inprocess_model_needs_no_server(query, hello_reference):
    assert_same_hello(lmql_backends.run_sync(query, decoder=capped()), hello_reference)


@pytest.mark.timeout(180)
def test_example3_runs_uncapped_to_the_end_of_the_context(hello_reference):
    result = lmql_backends.run_sync('argmax "Hello[WHO]" from "local:builtin:tiny"')
    assert result.prompt.startswith("Hello") and result.variables["WHO"] != ""
    assert result.variables["WHO"].startswith(hello_reference.variables["WHO"])  # argmax: the capped run is a prefix
    if hello_reference.is_truncated:
        assert len(result.variables["WHO"]) > len(hello_reference.variables["WHO"])


# ---- 4. lmql.model("local:...", cuda=True) as a Python object ------------------------------------

@pytest.mark.timeout(60)
def test_example4_model_object_in_from_and_as_model_argument(hello_reference):
    m = lmql_backends.model("local:builtin:tiny", cuda=True)

    @lmql_backends.query(model=m, decoder=capped())
    def hello():
        '''argmax "Hello[WHO]"'''

    results = [
        lmql_backends.run_sync('argmax "Hello[WHO]" from m', m=m, decoder=capped()),
        lmql_backends.run_sync('argmax "Hello[WHO]"', model=m, decoder=capped()),
        hello.run_sync(),
    ]
    for result in results:
        assert_same_hello(result, hello_reference)


# ---- 5. lmql.inprocess(...) with a decoder argument and constraints ------------------------------

@pytest.mark.timeout(60)
def test_example5_inprocess_with_chunk_timeout_and_constraints():
    query = r'''argmax(chunk_timeout=10.0) "Hello[WHO]" from lmql.inprocess("builtin:tiny", cuda=True) where STOPS_AT(WHO, "\n") and len(TOKENS(WHO)) < 10'''
    result = lmql_backends.run_sync(query)
    reference = lmql_backends.run_sync(CONSTRAINED_INPROCESS)
    assert_same_hello(result, reference)
    assert 1 <= len(model_tokens(result.variables["WHO"])) < 10
    assert "\n" not in result.variables["WHO"][:-1]


def model_tokens(text: str) -> list[int]:
    from lmql_backends.loader import load_tokenizer

    return load_tokenizer(MODEL)(text, add_special_tokens=False).input_ids


# ---- 6. the legacy backend: serve-model --legacy, argmax(backend="legacy") ------------------------

@pytest.mark.timeout(150)
def test_example6_legacy_backend(launch, hello_reference):
    port = port_or_free(DEFAULT_PORT)
    server = serve_model(launch, "--legacy", port=None if port == DEFAULT_PORT else port)
    query = f'argmax(backend="legacy") "Hello[WHO]" from {model_clause(port)}'
    assert_same_hello(lmql_backends.run_sync(query, decoder=capped(backend="legacy")), hello_reference)
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_example6_uncapped_query_stops_at_the_context_end(legacy_server):
    sentence = "It is a truth universally acknowledged. "
    text = sentence * (1000 // len(model_tokens(sentence)))  # about 1000 of the 1024 tokens of context
    query = f'argmax(backend="legacy") "{{text}}[WHO]" from lmql.model("builtin:tiny", endpoint="{legacy_server.endpoint}")'
    result = lmql_backends.run_sync(query, text=text)
    assert result.is_truncated and result.variables["WHO"] != ""


# ---- 7. serve() from Python, blocking and in the background; CUDA_VISIBLE_DEVICES ----------------

@pytest.mark.timeout(150)
def test_example7_blocking_serve_from_python(launch, hello_reference):
    port = port_or_free(EXAMPLE_PORT)
    script = f'import lmql_backends\nlmql_backends.serve("builtin:tiny", cuda=True, port={port}, trust_remote_code=True)\n'
    server = launch([sys.executable, "-c", script], port)
    query = f'argmax "Hello[WHO]" from lmql.model("builtin:tiny", endpoint="localhost:{port}")'
    assert_same_hello(lmql_backends.run_sync(query, decoder=capped()), hello_reference)
    assert server.stop() == 0
    if not HAS_GPU:
        assert CUDA_WARNING in server.output and "device cpu" in load_summary(server.output)


@pytest.mark.timeout(60)
def test_example7_background_serve_for_tests(hello_reference):
    handle = lmql_backends.serve("builtin:tiny", cuda=True, port=0, trust_remote_code=True, background=True)
    try:
        assert handle.port > 0 and handle.endpoint == f"127.0.0.1:{handle.port}"
        query = f'argmax "Hello[WHO]" from lmql.model("builtin:tiny", endpoint="localhost:{handle.port}")'
        assert_same_hello(lmql_backends.run_sync(query, decoder=capped()), hello_reference)
    finally:
        handle.stop()


@pytest.mark.timeout(150)
def test_example7_cuda_visible_devices_reaches_the_server(launch, hello_reference):
    port = port_or_free(DEFAULT_PORT)
    server = serve_model(launch, port=None if port == DEFAULT_PORT else port, CUDA_VISIBLE_DEVICES="0")
    query = f'argmax "Hello[WHO]" from {model_clause(port)}'
    assert_same_hello(lmql_backends.run_sync(query, decoder=capped()), hello_reference)
    assert server.stop() == 0
    summary = load_summary(server.output)
    assert summary.endswith(", CUDA_VISIBLE_DEVICES=0")
    assert "device cpu" in summary  # no --cuda: the CPU, whatever GPUs are visible


# ---- 8. --loader awq / gptq: only the missing-package error can run here ------------------------

@pytest.mark.timeout(120)
def test_example8_awq_and_gptq_loaders_name_the_extra_to_install():
    packages = {"awq": "awq", "gptq": "gptqmodel"}
    missing = [loader for loader, module in packages.items() if importlib.util.find_spec(module) is None]
    if not missing:
        pytest.skip("the AWQ and GPTQ packages are installed; loading needs a GPU and a quantized model")
    processes = {
        loader: subprocess.Popen(
            [*lmql_backends_command(), "serve-model", MODEL, "--loader", loader],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=subprocess_env(),
        )
        for loader in missing
    }
    for loader, process in processes.items():
        _, stderr = process.communicate(timeout=90)
        assert process.returncode == 2, stderr
        assert f"pip install 'lmql-backends[{loader}]'" in stderr
        assert f"--loader {loader}" in stderr


# ---- an in-process model is loaded once per process ----------------------------------------------

@pytest.mark.timeout(60)
def test_inprocess_model_stays_loaded_across_queries(monkeypatch, hello_reference):
    from transformers import AutoModelForCausalLM

    from lmql_backends.client.inprocess import InProcessClient
    from lmql_backends.loader import load_model

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    first = lmql_backends.run_sync('argmax "Hello[WHO]" from lmql.model("local:builtin:tiny")', decoder=capped())
    second = lmql_backends.run_sync('argmax "Hello[WHO]" from "local:builtin:tiny"', decoder=capped())
    assert calls == []  # hello_reference already loaded it in this process
    assert first.variables == second.variables == hello_reference.variables
    assert load_model(MODEL) is load_model(MODEL)
    assert InProcessClient(MODEL).engine is InProcessClient(MODEL).engine


RELOAD_SCRIPT = '''
import logging
import lmql_backends

logging.basicConfig(format="%(message)s")
logging.getLogger("lmql_backends.loader").setLevel(logging.DEBUG)  # prints the load summary
for _ in range(2):
    print(lmql_backends.run_sync('argmax "Hello[WHO]" from "local:builtin:tiny"', decoder=lmql_backends.argmax(max_len=8)).prompt)
'''


@pytest.mark.timeout(120)
def test_each_new_process_loads_the_model_again():
    argv = [sys.executable, "-c", RELOAD_SCRIPT]
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=subprocess_env())
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=100)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
        summaries = [line for line in output.splitlines() if line.startswith(LOAD_SUMMARY)]
        assert len(summaries) == 1, output  # one load per process, however many queries
        prompts = [line for line in output.splitlines() if line.startswith("Hello")]
        assert len(prompts) == 2 and prompts[0] == prompts[1]
