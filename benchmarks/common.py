"""Shared helpers of the benchmark scripts: models, server processes, prompts, timers, the table.

Every figure a benchmark reports is a `Figure`: a ratio measured in one run (the medians of
several repetitions, taken alternately so that load from other processes hits both sides),
the absolute numbers it came from, and its target. `format_table` prints them as one
Markdown table (the one in benchmarks/RESULTS.md).

Models: the embedded ``builtin:tiny`` and a GPT-2-small-shaped model with random weights
(12 layers, 12 heads, 768 wide, 1024 positions, 50257-token vocabulary) built from a config into
a temporary directory with the embedded tokenizer. The tokenizer produces ids < 2048 only; so
that greedy decoding never picks an id it cannot decode and never stops early, the (tied)
embedding rows of the ids >= 2048 and of EOS are zero: their logits are exactly 0, below the
best of the other 2047. The computation per token is that of GPT-2 small all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Awaitable, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lmql_backends.models import TINY_MODEL_DIR, TINY_MODEL_NAME  # noqa: E402

NUM_THREADS = 2
GPT2_SMALL_VOCAB = 50257
GPT2_SMALL_LABEL = "gpt2-small-random"
TINY_LABEL = "tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SERVER_START_SECONDS = 300.0
LOOPBACK = "127.0.0.1"

# Public-domain text (Jane Austen, Pride and Prejudice, chapter 1) for prompts.
PROMPT_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is "
    "let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long "
    "has just been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do you not want "
    "to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I have no "
    "objection to hearing it.\" This was invitation enough. "
)


# ---- settings, models and figures ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """How long a run is: `quick` shortens every benchmark (fewer tokens and repetitions)."""

    quick: bool = False

    @property
    def repetitions(self) -> int:
        return 2 if self.quick else 5

    def pick(self, full, quick):
        """`quick` in a quick run, else `full`."""
        return quick if self.quick else full


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A model under test: its short label in the table and the name the loader takes."""

    label: str
    name: str


@dataclasses.dataclass(frozen=True)
class Target:
    """A bound a ratio should meet, like ``>= 0.9``."""

    op: str
    bound: float

    def is_met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


def at_least(bound: float) -> Target:
    return Target(">=", bound)


def at_most(bound: float) -> Target:
    return Target("<=", bound)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One row of the result table: a ratio, what it compares, and its target (if any)."""

    benchmark: str
    model: str
    name: str
    ratio: float
    detail: str
    target: Target | None = None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "met" if self.target.is_met(self.ratio) else "MISSED"


def format_table(figures: list[Figure]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| benchmark | model | figure | ratio | target | met | measured |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for f in figures:
        target = str(f.target) if f.target else "-"
        lines.append(f"| {f.benchmark} | {f.model} | {f.name} | {f.ratio:.2f} | {target} | {f.verdict} | {f.detail} |")
    return "\n".join(lines)


def print_figures(figures: list[Figure]) -> None:
    print(format_table(figures), flush=True)


# ---- models ---------------------------------------------------------------------------------------

def build_gpt2_small_dir(path: Path) -> str:
    """Save the GPT-2-small-shaped random model (see the module docstring) and the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=GPT2_SMALL_VOCAB,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[len(tokenizer):] = 0
        model.transformer.wte.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (TINY_MODEL_DIR / name).exists():
            shutil.copy(TINY_MODEL_DIR / name, path / name)
    return str(path)


def make_models(which: str, workdir: Path) -> list[BenchModel]:
    """The models of a run: ``tiny``, ``gpt2-small`` or ``all``."""
    models = []
    if which in ("tiny", "all"):
        models.append(BenchModel(TINY_LABEL, TINY_MODEL_NAME))
    if which in ("gpt2-small", "all"):
        path = workdir / "gpt2-small-random"
        path.mkdir(parents=True, exist_ok=True)
        models.append(BenchModel(GPT2_SMALL_LABEL, build_gpt2_small_dir(path)))
    return models


def load_tokenizer_of(model: BenchModel):
    """The model's tokenizer (loaded once per process by the shared tokenizer cache)."""
    from lmql_backends.runtime.models import shared_tokenizer

    return shared_tokenizer(model.name)


def set_threads() -> None:
    """Use the machine's two cores for torch, as every server process does; no progress bars."""
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(NUM_THREADS)
    transformers_logging.disable_progress_bar()


# ---- prompts --------------------------------------------------------------------------------------

def text_token_ids(tokenizer) -> list[int]:
    return list(tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids)


def make_prompt_ids(tokenizer, length: int, seed: int) -> list[int]:
    """BOS then `length - 1` tokens of the prompt text, starting at an offset chosen by `seed`.

    Different seeds give different prompts, so no measurement reuses another's cached prefix.
    """
    text = text_token_ids(tokenizer)
    start = (seed * 7) % len(text)
    body = []
    while len(body) < length - 1:
        body.extend(text[start:] if not body else text)
    return [tokenizer.bos_token_id, *body[:length - 1]]


# ---- timing ---------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


Measure = Callable[[int], Awaitable[float]]


async def alternate_medians(repetitions: int, measures: dict[str, Measure]) -> dict[str, float]:
    """Run every measure once per repetition, in turn, and return the median of each.

    Alternating spreads the load of other processes over all measures instead of one.
    """
    values: dict[str, list[float]] = {name: [] for name in measures}
    for rep in range(repetitions):
        for name, measure in measures.items():
            values[name].append(await measure(rep))
    return {name: median(v) for name, v in values.items()}


def as_async(function: Callable[[int], float]) -> Measure:
    """A synchronous measure as an async one (it blocks the loop, which has nothing else to do)."""

    async def measure(rep: int) -> float:
        return function(rep)

    return measure


def decode_step_seconds(runner, past, num_rows: int, num_steps: int = 30) -> float:
    """Median seconds of a decode step of `num_rows` sequences that all start from `past`."""
    kvs, lengths = [past.prefix(past.length)] * num_rows, [past.length] * num_rows
    times = []
    for step in range(num_steps + 1):  # the first step packs the batch store: not timed
        start = time.perf_counter()
        _, kvs = runner.decode([step % 100 + 1] * num_rows, kvs, lengths)
        times.append(time.perf_counter() - start)
        lengths = [n + 1 for n in lengths]
    return median(times[1:])


@contextlib.contextmanager
def engine_thread_count(engine):
    """Run the block on the torch thread count of `engine`'s thread (chosen once when it started)."""
    engine.start().wait_ready(timeout=600)
    previous = torch.get_num_threads()
    torch.set_num_threads(engine.num_threads or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def hand_greedy_loop(model, prompt: list[int], num_tokens: int) -> tuple[list[int], float, float]:
    """The reference: transformers, a DynamicCache, one token per forward, argmax.

    Returns the tokens, the seconds to the first token and the seconds for all of them.
    """
    from transformers import DynamicCache

    from lmql_backends.engine.runner import cache_keyword

    start = time.perf_counter()
    cache, keyword = DynamicCache(), cache_keyword(model)
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, **{keyword: cache}, logits_to_keep=1)
    tokens = [int(torch.argmax(out.logits[0, -1]))]
    first = time.perf_counter() - start
    for _ in range(num_tokens - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{keyword: cache}, logits_to_keep=1)
        tokens.append(int(torch.argmax(out.logits[0, -1])))
    return tokens, first, time.perf_counter() - start


def num_tokens_before_eos(tokens: list[int], eos_token_id: int | None) -> int:
    """How many tokens a decode that stops after EOS returns (EOS included)."""
    if eos_token_id in tokens:
        return tokens.index(eos_token_id) + 1
    return len(tokens)


# ---- machine state ---------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server and its engine process)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [pid] + [p for child in children for p in process_tree(child)]


def describe_load(when: str) -> str:
    """The 1-minute load average: other processes on a shared machine distort every figure."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = "  (busy: other processes compete for the cores)" if load > cores * 0.75 else ""
    return f"load average {when}: {load:.2f} on {cores} cores{busy}"


# ---- server processes ------------------------------------------------------------------------------

def free_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(NUM_THREADS)
    return env


class ServerProcess:
    """``python -m lmql_backends.cli serve-model MODEL`` on a free loopback port, in a subprocess."""

    def __init__(self, model: str, legacy: bool = False, extra_args: tuple[str, ...] = ()):
        self.model, self.legacy, self.extra_args = model, legacy, extra_args
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self) -> list[str]:
        """The server's command line (a peer's server class gives its own)."""
        command = [sys.executable, "-m", "lmql_backends.cli", "serve-model", self.model,
                   "--host", LOOPBACK, "--port", str(self.port)] + (["--legacy"] if self.legacy else [])
        return command + list(self.extra_args)

    def env(self) -> dict[str, str]:
        return server_env()

    def start(self) -> "ServerProcess":
        """Start the server and wait until /health answers."""
        command = self.command()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not self.is_healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`{' '.join(command)}` did not come up:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, num_chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read()[-num_chars:]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ServerPool:
    """Server processes shared by the benchmarks of a run: started on first use, stopped at close."""

    def __init__(self):
        self._servers: dict[tuple[str, bool, tuple[str, ...]], ServerProcess] = {}

    def get(self, model: str, legacy: bool = False, extra_args: tuple[str, ...] = ()) -> ServerProcess:
        key = (model, legacy, extra_args)
        if key not in self._servers:
            self._servers[key] = ServerProcess(model, legacy, extra_args).start()
        return self._servers[key]

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


@dataclasses.dataclass
class BenchContext:
    """What every benchmark's `run` gets: settings, models and the shared servers."""

    settings: Settings
    models: list[BenchModel]
    servers: ServerPool


def concurrent_tokens_per_second(stream: Callable[[int], int], num_streams: int) -> float:
    """Aggregate tokens/s of `stream(i)` (which returns its number of tokens) in `num_streams` threads at once."""
    counts = [0] * num_streams

    def run(i: int) -> None:
        counts[i] = stream(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


# ---- streaming completions over raw HTTP --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamTiming:
    """Arrival times of the tokens of one streamed completion, in seconds after it was sent."""

    token_times: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)

    @property
    def first_token_seconds(self) -> float:
        return self.token_times[0]

    def gaps(self) -> list[float]:
        """Seconds between consecutive tokens (the per-token latency after the first)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


async def stream_completion(session, base_url: str, model: str, prompt: list[int], max_tokens: int) -> StreamTiming:
    """Stream a greedy completion of `prompt` (``ignore_eos``) and time each token's arrival."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True,
    }
    start = time.perf_counter()
    times: list[float] = []
    async with session.post(base_url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{base_url} answered HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            num = count_chunk_tokens(line)
            times.extend([time.perf_counter() - start] * num)
    return StreamTiming(tuple(times))


async def engine_stream_timing(engine, prompt: list[int], max_tokens: int,
                               stop_token_ids: frozenset[int] = frozenset()) -> StreamTiming:
    """A greedy request of `prompt` straight through an in-process `engine`, each token's arrival timed."""
    from lmql_backends.engine import Request, TokenOutput

    start, times = time.perf_counter(), []
    async for out in engine.stream(Request(list(prompt), max_tokens=max_tokens, stop_token_ids=stop_token_ids)):
        if isinstance(out, TokenOutput):
            times.append(time.perf_counter() - start)
    return StreamTiming(tuple(times))


def count_chunk_tokens(line: bytes) -> int:
    """Tokens in one SSE line of a completion stream (0 for blank lines, [DONE] and usage)."""
    text = line.decode().strip()
    if not text.startswith("data:") or text.endswith("[DONE]"):
        return 0
    chunk = json.loads(text[len("data:"):])
    if "error" in chunk:
        raise RuntimeError(f"the stream failed: {chunk['error']}")
    return sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in chunk.get("choices", []))


def make_http_session():
    """An aiohttp session without a connection limit (concurrency up to 16 streams)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))


def run_async(coroutine):
    return asyncio.run(coroutine)


def make_workdir() -> tempfile.TemporaryDirectory:
    """A temporary directory for the random model (about 500 MB), removed at the end."""
    return tempfile.TemporaryDirectory(prefix="lmql-backends-bench-")


def add_common_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--model", choices=("tiny", "gpt2-small", "all"), default="all", help="models (default all)")


def standalone_main(run: Callable[[BenchContext], Awaitable[list[Figure]]], doc: str) -> None:
    """The `main` of every benchmark script: the common flags, then `run_standalone`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_arguments(parser)
    run_standalone(run, parser.parse_args())


async def measure_each_model(context: "BenchContext", make_bench, session) -> list[Figure]:
    """Figures of ``make_bench(context, model, session)`` for every model (its legacy client closed)."""
    figures = []
    for model in context.models:
        bench = make_bench(context, model, session)
        try:
            figures += bench.figures(await bench.measure())
        finally:
            await bench.legacy.aclose()
    return figures


def run_standalone(run: Callable[[BenchContext], Awaitable[list[Figure]]], args, models_of=make_models) -> None:
    """Run one benchmark script on its own: build models (`models_of(args.model, workdir)`), start
    servers, print its table."""
    set_threads()
    with make_workdir() as workdir:
        context = BenchContext(Settings(args.quick), models_of(args.model, Path(workdir)), ServerPool())
        print(describe_load("at start"), flush=True)
        try:
            figures = run_async(run(context))
        finally:
            context.servers.close()
        print(describe_load("at end"))
        print_figures(figures)


# ---- comparisons with a peer installed in a throwaway venv (LMQL 0.0.6.3, LMQL 0.7.3) -------------

class LmqlBenchError(RuntimeError):
    """A comparison with a peer could not run; the message says which step failed and why."""


@dataclasses.dataclass
class Deadline:
    """The time left of a whole comparison (`what`, e.g. "the LMQL 0.7.3 comparison")."""

    end: float
    what: str
    limit: float

    @classmethod
    def after(cls, seconds: float, what: str) -> "Deadline":
        return cls(time.monotonic() + seconds, what, seconds)

    def seconds_left(self, step: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise LmqlBenchError(f"{self.what} ran out of its {self.limit:.0f} s before: {step}")
        return left


def run_step(step: str, command: list[str], deadline: Deadline, env: dict | None = None) -> str:
    """Run `command` within the deadline; its stdout, or LmqlBenchError with its output."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=deadline.seconds_left(step))
    except subprocess.TimeoutExpired:
        raise LmqlBenchError(f"{step}: no result within the {deadline.limit:.0f} s limit") from None
    if out.returncode != 0:
        raise LmqlBenchError(f"{step} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout
