"""Load test: how much concurrent load a server holds, and what happens beyond it.

Starts ``lmql-backends serve-model`` in a subprocess (loopback, free port, the given engine
limits), then for each concurrency level runs that many closed-loop users for a few seconds.
A new-API user streams completions of ``--max-tokens`` tokens; a legacy user (``--legacy``)
posts a ``forward`` and long-polls its result. Each request ends as one of:

- ``ok``       answered completely;
- ``refused``  429 with ``Retry-After`` (the queue is full: expected beyond the limits);
- ``failed``   anything else: a 5xx, a broken or incomplete answer, or no answer within
               ``--timeout`` seconds (a hang). A healthy server has none at any level.

Prints one table row per level (throughput, latency, refusals) with the throughput as a ratio
of the single-user throughput, then the held load: the highest level answered with no failure
and no refusal, and whether any level failed.

    PYTHONPATH=. python benchmarks/load.py [--legacy] [--levels 1,8,32,64,128] [--seconds 5]
        [--max-num-seqs 8] [--max-queue 16] [--max-tokens 32] [--model builtin:tiny]

Runs in about a minute with the defaults (keep it under two on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
STARTUP_SECONDS = 120
REFUSED_PAUSE_SECONDS = 0.1  # a refused user retries soon (not after Retry-After) to keep the pressure on


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """One run: the server's limits and the load offered to it."""

    model: str = "builtin:tiny"
    legacy: bool = False
    levels: tuple[int, ...] = (1, 8, 32, 64, 128)
    seconds: float = 5.0
    max_num_seqs: int = 8
    max_queue: int = 16
    max_tokens: int = 32
    prompt_tokens: int = 64
    timeout: float = 60.0


@dataclasses.dataclass
class LevelResult:
    """What happened at one concurrency level."""

    users: int
    seconds: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    num_refused: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    num_tokens: int = 0

    @property
    def num_ok(self) -> int:
        return len(self.latencies)

    @property
    def requests_per_second(self) -> float:
        return self.num_ok / self.seconds if self.seconds else 0.0

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


# ---- the server process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def start_server(config: LoadConfig, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "lmql_backends.cli", "serve-model", config.model, "--port", str(port),
        "--max-num-seqs", str(config.max_num_seqs), "--max-queue", str(config.max_queue), "--drain-seconds", "1",
    ] + (["--legacy"] if config.legacy else [])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_until_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the server did not start: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")


def stop_server(process: subprocess.Popen) -> int:
    """SIGTERM (graceful), then its exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


# ---- one request of each API ----------------------------------------------------------------


def make_prompt(config: LoadConfig, number: int) -> list[int]:
    """A prompt that shares no prefix with the others (so the prefix cache does not hide the load)."""
    return [0, *[(number * 7919 + i * 31) % 2000 + 1 for i in range(config.prompt_tokens - 1)]]


async def new_api_request(session: aiohttp.ClientSession, url: str, config: LoadConfig, number: int) -> tuple[str, int]:
    """('ok', tokens) | ('refused', 0) | ('failed: why', 0) for one streamed completion."""
    body = {"model": config.model, "prompt": make_prompt(config, number), "max_tokens": config.max_tokens,
            "ignore_eos": True, "temperature": 0.8, "seed": number, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as response:
        text = await response.text()
        if response.status == 429 and response.headers.get("Retry-After", "").isdigit():
            return "refused", 0
        if response.status != 200:
            return f"failed: HTTP {response.status}", 0
    payloads = [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]
    if not payloads or payloads[-1] != "[DONE]" or any('"error"' in p for p in payloads):
        return "failed: broken stream", 0
    return "ok", config.max_tokens


async def legacy_request(session: aiohttp.ClientSession, url: str, config: LoadConfig, number: int) -> tuple[str, int]:
    """One forward, then long-polls of its own client id until its result arrives."""
    client_id = f"load-{number}"
    body = {"action": "forward", "client_id": client_id, "sample_id": number, "attention_mask": None,
            "input_ids": [make_prompt(config, number)], "model_identifier": config.model}
    async with session.post(url + "/queue", data=json.dumps(body)) as response:
        if response.status == 429 and response.headers.get("Retry-After", "").isdigit():
            return "refused", 0
        if response.status != 200:
            return f"failed: HTTP {response.status}", 0
    while True:
        async with session.get(f"{url}/results/{client_id}", params={"wait": "10"}) as response:
            results = await response.json(content_type=None)
        for result in results:
            return ("ok", 1) if "next_token_logits" in result else (f"failed: {result.get('error')}", 0)


# ---- the load -------------------------------------------------------------------------------


async def user(session, url: str, config: LoadConfig, deadline: float, numbers, result: LevelResult) -> None:
    """One closed-loop user: a request, its outcome, the next request, until the deadline."""
    request = legacy_request if config.legacy else new_api_request
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            outcome, tokens = await asyncio.wait_for(request(session, url, config, next(numbers)), config.timeout)
        except asyncio.TimeoutError:
            outcome, tokens = f"failed: no answer within {config.timeout} s", 0
        except aiohttp.ClientError as exc:
            outcome, tokens = f"failed: {type(exc).__name__}", 0
        record(result, outcome, tokens, time.monotonic() - start)
        if outcome == "refused":
            await asyncio.sleep(REFUSED_PAUSE_SECONDS)


def record(result: LevelResult, outcome: str, tokens: int, seconds: float) -> None:
    if outcome == "ok":
        result.latencies.append(seconds)
        result.num_tokens += tokens
    elif outcome == "refused":
        result.num_refused += 1
    else:
        result.failures.append(outcome)


async def run_level(url: str, config: LoadConfig, users: int, numbers) -> LevelResult:
    result = LevelResult(users)
    connector = aiohttp.TCPConnector(limit=users + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.monotonic()
        deadline = start + config.seconds
        await asyncio.gather(*(user(session, url, config, deadline, numbers, result) for _ in range(users)))
        result.seconds = time.monotonic() - start
    return result


async def run_load(config: LoadConfig) -> tuple[list[LevelResult], int]:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    process = start_server(config, port)
    try:
        await wait_until_healthy(url, process)
        numbers = itertools.count()
        results = [await run_level(url, config, users, numbers) for users in config.levels]
    finally:
        exit_status = stop_server(process)
    return results, exit_status


# ---- the report -----------------------------------------------------------------------------


def format_report(config: LoadConfig, results: list[LevelResult], exit_status: int) -> str:
    api = "legacy forward + long-poll" if config.legacy else f"new API, {config.max_tokens}-token streams"
    capacity = config.max_num_seqs + config.max_queue
    lines = [
        f"# load: {config.model}, {api}; --max-num-seqs {config.max_num_seqs} --max-queue {config.max_queue} "
        f"(capacity {capacity}), {config.seconds:g} s per level",
        "",
        "| users | ok | refused (429) | failed | req/s | x single user | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    single = results[0].requests_per_second or float("nan")
    for r in results:
        lines.append(
            f"| {r.users} | {r.num_ok} | {r.num_refused} | {len(r.failures)} | {r.requests_per_second:.1f} | "
            f"{r.requests_per_second / single:.2f} | {r.latency_ms(0.5):.0f} | {r.latency_ms(0.95):.0f} |"
        )
    lines += ["", held_load_summary(results), f"server exit status after SIGTERM: {exit_status}"]
    failures = [f for r in results for f in r.failures]
    if failures:
        lines.append(f"failures (first 5): {failures[:5]}")
    return "\n".join(lines)


def held_load_summary(results: list[LevelResult]) -> str:
    clean = [r for r in results if not r.failures and not r.num_refused]
    failed = [r.users for r in results if r.failures]
    held = max(clean, key=lambda r: r.users) if clean else None
    if held is None:
        held_text = "held load: none (even the lowest level was refused or failed)"
    else:
        held_text = (f"held load: {held.users} concurrent users with no refusal and no failure "
                     f"({held.requests_per_second:.1f} req/s)")
    beyond = "every level answered or refused cleanly" if not failed else f"FAILURES at levels {failed}"
    return f"{held_text}; beyond it: {beyond}"


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=LoadConfig.model)
    parser.add_argument("--legacy", action="store_true", help="load the legacy API (forward + long-poll)")
    parser.add_argument("--levels", default=",".join(map(str, LoadConfig.levels)), help="concurrent users per level")
    parser.add_argument("--seconds", type=float, default=LoadConfig.seconds, help="seconds per level")
    parser.add_argument("--max-num-seqs", type=int, default=LoadConfig.max_num_seqs)
    parser.add_argument("--max-queue", type=int, default=LoadConfig.max_queue)
    parser.add_argument("--max-tokens", type=int, default=LoadConfig.max_tokens)
    parser.add_argument("--timeout", type=float, default=LoadConfig.timeout, help="seconds before a request is a hang")
    args = parser.parse_args(argv)
    levels = tuple(int(level) for level in args.levels.split(","))
    return LoadConfig(args.model, args.legacy, levels, args.seconds, args.max_num_seqs, args.max_queue,
                      args.max_tokens, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    results, exit_status = asyncio.run(run_load(config))
    print(format_report(config, results, exit_status))
    return 0 if exit_status == 0 and not any(r.failures for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
