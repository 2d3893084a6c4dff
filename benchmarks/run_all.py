"""Run every benchmark and print one table of ratios (benchmarks/RESULTS.md).

Benchmarks, in order: single stream, legacy per-token latency, prompt scaling, concurrency, constraints, time to first
token and memory, each piece of tuning on and off, mask speed on a 50k vocabulary (``benchmarks/masks.py``), and with
``--with-lmql-0063`` the comparison with LMQL 0.0.6.3's own server (slow: it installs LMQL in
a throwaway venv). Models: the embedded ``builtin:tiny`` and a GPT-2-small-shaped random
model. Servers are ``serve-model`` subprocesses on loopback ports, shared by the benchmarks
(memory uses fresh ones). About 10-15 minutes on 2 cores; ``--quick`` about 4.

    python benchmarks/run_all.py [--quick] [--model tiny|gpt2-small|all] [--only NAME ...]
                                 [--with-lmql-0063] [--output FILE.md]

Exit status 1 when a benchmark failed (the others still run), else 0; missed targets are
reported in the table, not in the exit status.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import common
import concurrency
import constraints
import kv_budget
import legacy_latency
import scaling
import shared_prefix
import single_stream
import ttft_memory
import tuning
from common import BenchContext, Figure, ServerPool, Settings, at_most

BENCHMARKS = {
    "single_stream": single_stream.run,
    "legacy_latency": legacy_latency.run,
    "scaling": scaling.run,
    "concurrency": concurrency.run,
    "constraints": constraints.run,
    "ttft_memory": ttft_memory.run,
    "tuning": tuning.run,
    "shared_prefix": shared_prefix.run,
    "kv_budget": kv_budget.run,
}
DEFAULT_RUN = [*BENCHMARKS, "masks"]
MASKS_LINE = re.compile(r"^(?P<name>\S.*?)\s+(?P<median>\d+\.\d+)\s+(?P<target>\d+\.\d+)\s+\d+\.\d+$")


def run_masks_script(settings: Settings) -> list[Figure]:
    """Run benchmarks/masks.py (not ours to change) and turn its table into figures."""
    script = Path(__file__).with_name("masks.py")
    out = subprocess.run([sys.executable, str(script), "--steps", settings.pick("300", "100")],
                         capture_output=True, text=True, env=common.server_env(), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks/masks.py failed:\n{out.stderr[-2000:]}")
    figures = [masks_figure(match) for match in map(MASKS_LINE.match, out.stdout.splitlines()) if match]
    if not figures:
        raise RuntimeError(f"benchmarks/masks.py printed no result line this script can read:\n{out.stdout}")
    return figures


def masks_figure(match: re.Match) -> Figure:
    median, target = float(match["median"]), float(match["target"])
    name = f"{match['name']}: median mask ms / target ms"
    return Figure("masks", "50k vocab", name, median / target, f"{median:.3f} ms per step (target {target:g} ms)",
                  at_most(1.0))


def run_benchmark(name: str, context: BenchContext) -> list[Figure]:
    """One benchmark's figures; prints its duration."""
    start = time.perf_counter()
    print(f"\n== {name} ({common.describe_load('now')})", flush=True)
    if name == "masks":
        figures = run_masks_script(context.settings)
    elif name == "lmql_0063":
        import lmql_0063

        figures = lmql_0063.compare(context)
    else:
        figures = common.run_async(BENCHMARKS[name](context))
    print(f"== {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    common.print_figures(figures)
    return figures


def describe_machine(settings: Settings) -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{'quick' if settings.quick else 'full'} run")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=DEFAULT_RUN + ["lmql_0063"], help="run only these benchmarks")
    parser.add_argument("--with-lmql-0063", action="store_true", help="also compare with LMQL 0.0.6.3 (installs it)")
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) to this file")
    return parser


def run_selected(names: list[str], context: BenchContext) -> tuple[list[Figure], list[str]]:
    """The figures of every benchmark in `names`, and the names of those that crashed."""
    figures, failed = [], []
    for name in names:
        try:
            figures += run_benchmark(name, context)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    return figures, failed


def main() -> int:
    args = make_parser().parse_args()
    selected = args.only or DEFAULT_RUN + (["lmql_0063"] if args.with_lmql_0063 else [])
    common.set_threads()
    settings = Settings(args.quick)
    started = time.perf_counter()
    summary = [describe_machine(settings), common.describe_load("at start")]
    print("\n".join(summary), flush=True)
    with common.make_workdir() as workdir:
        context = BenchContext(settings, common.make_models(args.model, Path(workdir)), ServerPool())
        try:
            figures, failed = run_selected(selected, context)
        finally:
            context.servers.close()
    summary += [common.describe_load("at end"), f"total {time.perf_counter() - started:.0f} s"]
    table = common.format_table(figures)
    print("\n" + "\n".join(summary) + "\n\n" + table)
    if args.output:
        args.output.write_text("\n".join(f"- {line}" for line in summary) + "\n\n" + table + "\n")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
