"""Time to first token, and resident memory per server process.

Time to first token (a fresh 128-token prompt each time, so nothing is prefix-cached):

- new server: a streamed greedy ``/v1/completions`` request, until its first token arrives;
- legacy server: one ``forward`` (``/queue`` then ``/results``) until its logits are back;
- reference: the hand loop's first token (transformers forward of the prompt, then argmax).

Memory: fresh ``python -m lmql_backends.cli serve-model M [--legacy]`` processes, RSS from
/proc/PID/status after a warm-up request, summed over the server process and its engine process
(pages both map, such as torch's libraries, count twice), against a bare process that loads the
same model with transformers and runs the same prompt through it.

Figures are ratios to the reference (time) and to the bare process (memory); no targets.

    python benchmarks/ttft_memory.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import (
    BenchContext, BenchModel, Figure, ServerProcess, alternate_medians, as_async, hand_greedy_loop, make_http_session,
    make_prompt_ids, measure_each_model, process_tree, rss_mib, standalone_main, server_env, stream_completion,
)

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.loader import resolve_model_path

PROMPT_TOKENS = 128
WARM_UP_TOKENS = 16
BARE_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.inference_mode():
    model(input_ids=torch.tensor([[int(t) for t in sys.argv[2].split(",")]]))
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) / 1024)
"""


# ---- time to first token -------------------------------------------------------------------------

class FirstToken:
    """Time-to-first-token measurements of one model."""

    def __init__(self, context: BenchContext, model: BenchModel, session):
        self.context, self.model, self.session = context, model, session
        self.inprocess = InProcessClient(model.name)
        self.tokenizer = self.inprocess.tokenizer
        self.new = context.servers.get(model.name)
        legacy = context.servers.get(model.name, legacy=True)
        self.legacy = LegacyClient(model.name, legacy.endpoint, self.tokenizer, chunk_timeout=300)

    def prompt(self, path: str, rep: int) -> list[int]:
        """A prompt no earlier request has used (each server has its own prefix cache)."""
        return make_prompt_ids(self.tokenizer, PROMPT_TOKENS, seed=9000 + 10 * rep + len(path))

    def hand(self, rep: int) -> float:
        _, first, _ = hand_greedy_loop(self.inprocess.loaded.model, self.prompt("hand", rep), 1)
        return first

    async def new_server(self, rep: int) -> float:
        timing = await stream_completion(self.session, self.new.base_url, self.model.name, self.prompt("new", rep), 2)
        return timing.first_token_seconds

    async def legacy_server(self, rep: int) -> float:
        start = time.perf_counter()
        await self.legacy.next_token_logits(self.prompt("legacy", rep))
        return time.perf_counter() - start

    async def measure(self) -> dict[str, float]:
        await self.new_server(99)
        await self.legacy_server(99)
        self.hand(99)
        return await alternate_medians(self.context.settings.pick(5, 3), {
            "hand": as_async(self.hand), "new server": self.new_server, "legacy server": self.legacy_server,
        })

    def figures(self, seconds: dict[str, float]) -> list[Figure]:
        hand = seconds["hand"]
        return [
            Figure("time to first token", self.model.label, f"{path} / hand loop first token", seconds[path] / hand,
                   f"{seconds[path] * 1e3:.1f} vs {hand * 1e3:.1f} ms ({PROMPT_TOKENS}-token prompt)")
            for path in ("new server", "legacy server")
        ]


# ---- memory --------------------------------------------------------------------------------------

def bare_rss_mib(model: BenchModel, prompt: list[int]) -> float:
    """RSS of a process that only loads the model with transformers and runs `prompt`."""
    command = [sys.executable, "-c", BARE_PROCESS, resolve_model_path(model.name), ",".join(map(str, prompt))]
    out = subprocess.run(command, capture_output=True, text=True, env=server_env(), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the bare transformers process failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


async def server_rss_mib(model: BenchModel, legacy: bool, prompt: list[int], session, tokenizer) -> list[float]:
    """RSS of each process of a fresh server (the server's, then its engine process's) after one warm-up request."""
    with ServerProcess(model.name, legacy) as server:
        if legacy:
            async with LegacyClient(model.name, server.endpoint, tokenizer, chunk_timeout=300) as client:
                await client.next_token_logits(prompt)
        else:
            await stream_completion(session, server.base_url, model.name, prompt, WARM_UP_TOKENS)
        return [rss_mib(pid) for pid in process_tree(server.pid)]


async def memory_figures(model: BenchModel, session) -> list[Figure]:
    tokenizer = InProcessClient(model.name).tokenizer
    prompt = make_prompt_ids(tokenizer, PROMPT_TOKENS, seed=1)
    bare = bare_rss_mib(model, prompt)
    figures = []
    for legacy in (False, True):
        each = await server_rss_mib(model, legacy, prompt, session, tokenizer)
        rss = sum(each)
        name = f"{'legacy' if legacy else 'new'} server processes RSS / bare transformers process"
        detail = f"{rss:.0f} ({' + '.join(f'{r:.0f}' for r in each)}) vs {bare:.0f} MiB after one request"
        figures.append(Figure("memory", model.label, name, rss / bare, detail))
    return figures


async def run(context: BenchContext) -> list[Figure]:
    """Time-to-first-token and memory figures of every model of `context`."""
    async with make_http_session() as session:
        figures = await measure_each_model(context, FirstToken, session)
        for model in context.models:
            figures += await memory_figures(model, session)
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
