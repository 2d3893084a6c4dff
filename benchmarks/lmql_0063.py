"""Optional: the same argmax query through LMQL 0.0.6.3's own server and client vs our legacy path.

Steps (about 2-5 minutes; never more than 15, or it stops with an error):

1. a throwaway venv (``python -m venv`` in a temporary directory) with ``torch==2.13.0`` first
   (pip takes it from the local wheel), then ``lmql[hf]==0.0.6.3`` and the pins it needs
   (transformers 4.29.2, tokenizers 0.13.3, numpy 1.23.5, setuptools 80.9.0, accelerate 0.19.0);
2. the embedded model saved in a form transformers 4.29.2 reads (``pytorch_model.bin``, and
   ``vocab.json`` + ``merges.txt`` for its byte-level BPE tokenizer);
3. LMQL's server (``python -m lmql.model.serve DIR --host 127.0.0.1 --port P``) and its client
   (``lmql.connect`` + ``lmql.query``) run an argmax query of 32 new tokens (``max_len`` bounds it:
   0.0.6.3's ``len(TOKENS(X))`` fails on Transformers models);
4. the same query through our runtime against ``serve-model --legacy`` (``argmax(backend="legacy")``);
   the two sides take turns, one query each, so that a slow phase of a shared machine hits both.

Prints the ratio of LMQL 0.0.6.3's time per query to ours (target >= 30). HOME and TMPDIR point
into the temporary directory while LMQL runs, so its tokenizer cache and query files go with it.

    python benchmarks/lmql_0063.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import (
    Deadline, LmqlBenchError, run_step,
    LOOPBACK, BenchContext, BenchModel, Figure, ServerPool, Settings, at_least, free_port, median, set_threads,
)

from lmql_backends.models import TINY_MODEL_DIR, TINY_MODEL_NAME

TIME_LIMIT_SECONDS = 15 * 60
TORCH_PIN = "torch==2.13.0"
LMQL_PINS = ("lmql[hf]==0.0.6.3", "transformers==4.29.2", "tokenizers==0.13.3", "numpy==1.23.5",
             "setuptools==80.9.0", "accelerate==0.19.0")
WHERE = "len(X) < 120"
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
TARGET = at_least(30.0)

# Run by the throwaway venv's Python: argv = endpoint, model dir, prompt, where clause, repetitions.
DRIVER = r'''
import asyncio, json, sys, time
import lmql

endpoint, model, prompt, where, repetitions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
lmql.connect(server=endpoint, model_name=model)
query = lmql.query(f"""argmax
    "{prompt}[X]"
from
    "{model}"
where
    {where}
""")

async def timed():
    start = time.perf_counter()
    result = await query()
    return time.perf_counter() - start, result

async def main():
    _, result = await timed()
    seconds = [(await timed())[0] for _ in range(repetitions)]
    text = result[0].variables["X"] if isinstance(result, list) else result.variables["X"]
    print(json.dumps({"seconds": seconds, "text": text}))

asyncio.run(main())
'''


def make_venv(root: Path, deadline: Deadline) -> Path:
    """A venv with LMQL 0.0.6.3 and its pins; returns its python."""
    run_step("creating the venv", [sys.executable, "-m", "venv", str(root)], deadline)
    python = root / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    run_step(f"pip install {TORCH_PIN}", pip + [TORCH_PIN], deadline)
    run_step(f"pip install {' '.join(LMQL_PINS)}", pip + list(LMQL_PINS), deadline)
    return python


def lmql_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), TMPDIR=str(home), OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return env


# ---- the embedded model for transformers 4.29.2 --------------------------------------------------------

def save_for_old_transformers(dest: Path) -> str:
    """The embedded model as transformers 4.29.2 / tokenizers 0.13.3 read it; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "transformers_version")}
    (dest / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, dest / "pytorch_model.bin")
    save_bpe_files(dest)
    return str(dest)


def save_bpe_files(dest: Path) -> None:
    """vocab.json, merges.txt and a GPT-2 tokenizer config from the embedded tokenizer.json."""
    spec = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())
    bpe = spec["model"]
    (dest / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = next(t["content"] for t in spec["added_tokens"] if t["special"])
    tokens = {"bos_token": special, "eos_token": special, "unk_token": special}
    (dest / "special_tokens_map.json").write_text(json.dumps(tokens))
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 1024, **tokens}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


# ---- LMQL 0.0.6.3's server ----------------------------------------------------------------------------

class OriginalServer:
    """``python -m lmql.model.serve DIR`` in its own process group (it starts worker processes)."""

    def __init__(self, python: Path, model_dir: str, env: dict[str, str], log: Path):
        self.python, self.model_dir, self.env, self.log_path = python, model_dir, env, log
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, deadline: Deadline) -> "OriginalServer":
        command = [str(self.python), "-m", "lmql.model.serve", self.model_dir, "--host", LOOPBACK,
                   "--port", str(self.port), "--wait_until_ready"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        while not self.is_up():
            if self.process.poll() is not None:
                raise LmqlBenchError(f"LMQL 0.0.6.3's server exited:\n{self.log_path.read_text()[-3000:]}")
            deadline.seconds_left("LMQL 0.0.6.3's server started")
            time.sleep(0.5)
        return self

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/results/probe", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        """Stop the server and its worker processes (the process group it leads)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


# ---- the two measurements -----------------------------------------------------------------------------

def num_text_tokens(text: str) -> int:
    """Tokens of `text` (re-tokenized: about the number of tokens the query generated)."""
    from lmql_backends.loader import load_tokenizer

    return len(load_tokenizer(TINY_MODEL_NAME)(text, add_special_tokens=False).input_ids)


def time_original_once(python: Path, server: OriginalServer, model_dir: str, deadline: Deadline) -> tuple[float, str]:
    """Seconds of one query (after a warm-up query) and its text, LMQL 0.0.6.3's client against its server."""
    command = [str(python), "-c", DRIVER, server.endpoint, model_dir, PROMPT, WHERE, "1"]
    result = json.loads(run_step("the query through LMQL 0.0.6.3", command, deadline, server.env).strip().splitlines()[-1])
    return result["seconds"][0], result["text"]


def make_our_query(servers: ServerPool) -> str:
    """The same query through our runtime against our legacy server."""
    server = servers.get(TINY_MODEL_NAME, legacy=True)
    return (f'argmax(backend="legacy") "{PROMPT}[X]" '
            f'from lmql.model("{TINY_MODEL_NAME}", endpoint="{server.endpoint}") where {WHERE}')


def time_ours_once(query: str) -> tuple[float, str]:
    """Seconds of one run of `query` and its text."""
    from lmql_backends.runtime.api import run_sync

    start = time.perf_counter()
    result = run_sync(query)
    return time.perf_counter() - start, result.variables["X"]


def time_both(python: Path, server: OriginalServer, model_dir: str, context: BenchContext,
              deadline: Deadline) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """(seconds, text) of each repetition on both sides, in turn: a slow phase of a shared machine
    hits both alike (timing all of one side first made a run's ratio depend on when it ran)."""
    our_query = make_our_query(context.servers)
    time_ours_once(our_query)  # warm-up
    theirs, ours = [], []
    for _ in range(context.settings.pick(5, 3)):
        theirs.append(time_original_once(python, server, model_dir, deadline))
        ours.append(time_ours_once(our_query))
    return theirs, ours


def compare(context: BenchContext) -> list[Figure]:
    """Install LMQL 0.0.6.3, time both paths in turn, and return the figure."""
    deadline = Deadline.after(TIME_LIMIT_SECONDS, "the LMQL 0.0.6.3 comparison")
    with tempfile.TemporaryDirectory(prefix="lmql-0063-") as tmp:
        root = Path(tmp)
        python = make_venv(root / "venv", deadline)
        model_dir = save_for_old_transformers(root / "tiny-model")
        server = OriginalServer(python, model_dir, lmql_env(root), root / "server.log").start(deadline)
        try:
            original, ours = time_both(python, server, model_dir, context, deadline)
        finally:
            server.stop()
    return [make_figure(original, ours)]


def make_figure(original: list[tuple[float, str]], ours: list[tuple[float, str]]) -> Figure:
    """The ratio of the median seconds per query, with both texts compared."""
    theirs, mine = median([s for s, _ in original]), median([s for s, _ in ours])
    their_text, our_text = original[-1][1], ours[-1][1]
    print(f"LMQL 0.0.6.3 wrote {their_text!r}; lmql-backends wrote {our_text!r}", flush=True)
    num_tokens = num_text_tokens(our_text)
    detail = (f"{theirs * 1e3:.0f} vs {mine * 1e3:.1f} ms per query (`where {WHERE}`, about {num_tokens} "
              f"tokens: {theirs * 1e3 / num_tokens:.1f} vs {mine * 1e3 / num_tokens:.2f} ms per token; "
              f"the two timed in turn)")
    if their_text != our_text:
        detail += "; the two wrote different text"
    name = "LMQL 0.0.6.3 server+client / our legacy path, time per argmax query"
    return Figure("lmql 0.0.6.3", "tiny", name, theirs / mine, detail, TARGET)


def main() -> int:
    from common import describe_load, print_figures

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    set_threads()
    context = BenchContext(Settings(args.quick), [BenchModel("tiny", TINY_MODEL_NAME)], ServerPool())
    print(describe_load("at start"), flush=True)
    try:
        figures = compare(context)
    except LmqlBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        context.servers.close()
    print(describe_load("at end"))
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
