"""Optional: LMQL 0.7.3's own client against its own `lmql serve-model` and against ours (LMTP).

Steps (about 5-10 minutes; never more than 30, or it stops with an error):

1. a throwaway venv with ``lmql[hf]==0.7.3`` and the pins it needs (`LMQL_PINS`; torch from the
   local wheel first), or an existing one given with ``--venv`` (made the same way);
2. the models saved in a form transformers 4.34 reads (``pytorch_model.bin``; ``vocab.json`` +
   ``merges.txt`` for the byte-level BPE tokenizer): the embedded model and the
   GPT-2-small-shaped one of common.py;
3. per model, LMQL's server (``lmql serve-model DIR``) and ours (``serve-model DIR``) both up,
   answering in turn (one driver run each per repetition) the same LMQL 0.7.3 program (`DRIVER`,
   `lmql.model(DIR, endpoint=...)`): argmax queries with STOPS_AT, ``len``, ``len(TOKENS)``,
   ``in``, INT and a distribution clause.

Checks that both servers give the same answers, and prints the time per query and the ratio
(LMQL's server / ours). Targets: embedded model ``len(X) <``, ``len(TOKENS(X)) <``, ``in`` >= 3;
GPT-2-small shape after a 1000-token prompt, ``len(X) < 120`` (LMQL asks 16 tokens per GENERATE,
its server recomputes the whole prompt for each) >= 5; 16-token prompt, ``len(TOKENS(X)) < 65``
(one GENERATE, the model's decode dominates) >= 0.95.

    python benchmarks/lmql_073.py [--quick] [--model tiny|gpt2-small|all] [--venv DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    Deadline, LmqlBenchError, run_step,
    GPT2_SMALL_LABEL, LOOPBACK, PROMPT_TEXT, TINY_LABEL, Figure, ServerProcess, at_least, build_gpt2_small_dir,
    describe_load, free_port, median, print_figures, set_threads,
)
from lmql_0063 import lmql_env, save_bpe_files

from lmql_backends.models import TINY_MODEL_DIR

TIME_LIMIT_SECONDS = 30 * 60
TORCH_PIN = "torch==2.13.0"
LMQL_PINS = ("lmql[hf]==0.7.3", "transformers==4.34.0", "tokenizers==0.14.1", "huggingface-hub==0.17.3",
             "accelerate==0.23.0", "numpy==1.26.4", "aiohttp==3.8.6")
LMQL_START_SECONDS = 300
PROBABILITY_TOLERANCE = 1e-4


def query(prompt: str, where: str = "", distribution: str = "") -> str:
    """An argmax LMQL query (the model comes from the driver's ``model=``)."""
    code = f'argmax\n    "{prompt}"\n'
    if where:
        code += f"where\n    {where}\n"
    if distribution:
        code += f"distribution\n    {distribution}\n"
    return code


def long_prompt_text(num_tokens: int) -> str:
    """About `num_tokens` tokens of the prompt text, with nothing LMQL would read as syntax."""
    from lmql_backends.loader import load_tokenizer

    clean = "".join(c for c in PROMPT_TEXT if c not in '"[]{}\\\n')
    tokenizer = load_tokenizer(str(TINY_MODEL_DIR))
    ids = []
    while len(ids) < num_tokens:
        ids += tokenizer(clean, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:num_tokens])


# name -> (query, timed with a target?)
TINY_QUERIES = {
    "STOPS_AT": query("It is a truth[X]", 'STOPS_AT(X, ",") and len(TOKENS(X)) < 24'),
    "len(X) < 120": query("It is a truth universally acknowledged[X]", "len(X) < 120"),
    "len(TOKENS(X)) < 32": query("It is a truth universally acknowledged[X]", "len(TOKENS(X)) < 32"),
    "in": query("Q: Name a colour:[C]", 'C in [" red", " green", " blue", " yellow"]'),
    "INT": query("Q: How many legs has a cat?\\nA: [N]", "INT(N) and len(TOKENS(N)) < 4"),
    "distribution": query("It is[X] Is it true? Answer:[ANSWER]", "len(TOKENS(X)) < 4",
                          'ANSWER in [" yes", " no"]'),
}
TINY_TARGETS = {"len(X) < 120": 3.0, "len(TOKENS(X)) < 32": 3.0, "in": 3.0}


def gpt2_queries() -> dict[str, str]:
    return {
        "950-token prompt, len(X) < 120": query(long_prompt_text(950) + "[X]", "len(X) < 120"),
        "16-token prompt, len(TOKENS(X)) < 65": query(long_prompt_text(16) + "[X]", "len(TOKENS(X)) < 65"),
    }


GPT2_TARGETS = {"950-token prompt, len(X) < 120": 5.0, "16-token prompt, len(TOKENS(X)) < 65": 0.95}

# Run by the venv's Python: argv = endpoint, model dir, spec file ({"queries": {name: code}, "repetitions"}).
# The first run of each query is a warm-up; one event loop for all (LMQL 0.7.3 needs that).
DRIVER = r'''
import asyncio, json, sys, time
import lmql

endpoint, model_dir, spec_path = sys.argv[1], sys.argv[2], sys.argv[3]
spec = json.load(open(spec_path))

def answer(result):
    if isinstance(result, list):
        result = result[0]
    variables = {k: v for k, v in result.variables.items() if not k.startswith(("P(", "log P("))}
    distribution = result.variables.get("P(ANSWER)")
    return {"variables": variables, "distribution": [[v, float(p)] for v, p in distribution] if distribution else None}

async def main():
    model = lmql.model(model_dir, endpoint=endpoint)
    out = {}
    for name, code in spec["queries"].items():
        q = lmql.query(code)
        seconds, result = [], None
        for _ in range(spec["repetitions"] + 1):
            start = time.perf_counter()
            result = await q(model=model)
            seconds.append(time.perf_counter() - start)
        out[name] = {"seconds": seconds[1:], **answer(result)}
    print("RESULT " + json.dumps(out), flush=True)

asyncio.run(main())
'''


def make_venv(root: Path, deadline: Deadline) -> Path:
    """A venv with LMQL 0.7.3 and its pins (Python 3.11, as LMQL 0.7.3 wants); returns its python."""
    run_step("creating the venv", ["python3.11", "-m", "venv", str(root)], deadline)
    python = root / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    run_step(f"pip install {TORCH_PIN}", pip + [TORCH_PIN], deadline)
    run_step(f"pip install {' '.join(LMQL_PINS)}", pip + [TORCH_PIN, *LMQL_PINS], deadline)
    return python


def save_for_transformers_434(source: str, dest: Path) -> str:
    """The model at `source` as transformers 4.34 / tokenizers 0.14 read it; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "transformers_version")}
    (dest / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, dest / "pytorch_model.bin")
    save_bpe_files(dest)
    return str(dest)


class LmqlServer:
    """``lmql serve-model DIR`` (LMQL 0.7.3's LMTP server) in its own process group."""

    def __init__(self, python: Path, model_dir: str, env: dict[str, str], log: Path):
        self.python, self.model_dir, self.env, self.log_path = python, model_dir, env, log
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, deadline: Deadline) -> "LmqlServer":
        lmql = self.python.parent / "lmql"
        command = [str(lmql), "serve-model", self.model_dir, "--host", LOOPBACK, "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        give_up = time.monotonic() + LMQL_START_SECONDS
        while "ready on device" not in self.log_path.read_text():  # it loads the model after opening the port
            if self.process.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise LmqlBenchError(f"LMQL 0.7.3's server did not come up:\n{self.log_path.read_text()[-3000:]}")
            deadline.seconds_left("LMQL 0.7.3's server started")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def run_driver(python: Path, endpoint: str, model_dir: str, queries: dict[str, str], repetitions: int,
               workdir: Path, deadline: Deadline, env: dict[str, str]) -> dict:
    """The answers and seconds of every query, LMQL 0.7.3's client against the server at `endpoint`."""
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"queries": queries, "repetitions": repetitions}))
    driver = workdir / "driver.py"
    driver.write_text(DRIVER)
    out = run_step(f"LMQL 0.7.3's client against {endpoint}", [str(python), str(driver), endpoint, model_dir, str(spec)],
                   deadline, env)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def alternate_drivers(python: Path, endpoints: list[str], model_dir: str, queries: dict[str, str], repetitions: int,
                      workdir: Path, deadline: Deadline, env: dict[str, str]) -> list[dict]:
    """Each endpoint's answers and seconds, one timed run of every query per driver, the servers in
    turn (so load from other processes hits both; an idle server of either kind waits on its socket)."""
    results: list[dict] = [{} for _ in endpoints]
    for _ in range(repetitions):
        for endpoint, result in zip(endpoints, results):
            run = run_driver(python, endpoint, model_dir, queries, 1, workdir, deadline, env)
            for name, item in run.items():
                if name in result:
                    result[name]["seconds"] += item["seconds"]
                else:
                    result[name] = item
    return results


def answers_equal(theirs: dict, ours: dict) -> bool:
    if theirs["variables"] != ours["variables"]:
        return False
    if (theirs["distribution"] is None) != (ours["distribution"] is None):
        return False
    return theirs["distribution"] is None or all(
        a[0] == b[0] and math.isclose(a[1], b[1], abs_tol=PROBABILITY_TOLERANCE)
        for a, b in zip(theirs["distribution"], ours["distribution"])
    )


def compare_model(label: str, model_dir: str, queries: dict[str, str], targets: dict[str, float], python: Path,
                  repetitions: int, workdir: Path, deadline: Deadline) -> tuple[list[Figure], list[str]]:
    """Both servers in turn on one model: a figure per query, and the queries whose answers differ."""
    env = lmql_env(workdir)
    server = LmqlServer(python, model_dir, env, workdir / f"lmql-server-{label}.log").start(deadline)
    try:
        with ServerProcess(model_dir) as ours_server:
            theirs, ours = alternate_drivers(python, [server.endpoint, ours_server.endpoint], model_dir, queries,
                                             repetitions, workdir, deadline, env)
    finally:
        server.stop()
    figures, differing = [], []
    for name in queries:
        equal = answers_equal(theirs[name], ours[name])
        if not equal:
            differing.append(f"{label} {name}: LMQL's server {theirs[name]} vs ours {ours[name]}")
        their_s, our_s = median(theirs[name]["seconds"]), median(ours[name]["seconds"])
        detail = (f"{their_s * 1e3:.0f} vs {our_s * 1e3:.0f} ms per query; answers "
                  f"{'equal' if equal else 'DIFFER'}: {json.dumps(ours[name]['variables'])[:80]}")
        target = at_least(targets[name]) if name in targets else None
        figures.append(Figure("lmql 0.7.3", label, f"LMQL server / ours, `{name}`", their_s / our_s, detail, target))
    return figures, differing


def run(args) -> int:
    deadline = Deadline.after(TIME_LIMIT_SECONDS, "the LMQL 0.7.3 comparison")
    repetitions = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="lmql-073-") as tmp:
        root = Path(tmp)
        python = Path(args.venv) / "bin" / "python" if args.venv else make_venv(root / "venv", deadline)
        figures, differing = [], []
        if args.model in ("tiny", "all"):
            model_dir = save_for_transformers_434(str(TINY_MODEL_DIR), root / "tiny")
            more = compare_model(TINY_LABEL, model_dir, TINY_QUERIES, TINY_TARGETS, python, repetitions, root, deadline)
            figures += more[0]
            differing += more[1]
        if args.model in ("gpt2-small", "all"):
            built = build_gpt2_small_dir(root / "gpt2-small-built")
            model_dir = save_for_transformers_434(built, root / "gpt2-small")
            more = compare_model(GPT2_SMALL_LABEL, model_dir, gpt2_queries(), GPT2_TARGETS, python, repetitions,
                                 root, deadline)
            figures += more[0]
            differing += more[1]
    print_figures(figures)
    for line in differing:
        print(f"answers differ: {line}", file=sys.stderr)
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repetition per query instead of three")
    parser.add_argument("--model", choices=("tiny", "gpt2-small", "all"), default="all")
    parser.add_argument("--venv", default=None, help="an existing venv with LMQL 0.7.3 (made as in step 1)")
    args = parser.parse_args()
    set_threads()
    print(describe_load("at start"), flush=True)
    try:
        return run(args)
    except LmqlBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print(describe_load("at end"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
