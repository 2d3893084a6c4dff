"""The ``lmql-backends`` command: serve-model, run, demo, conformance, migrate.

``lmql-backends serve-model MODEL [--legacy] [--port P] [--cuda] [--dtype D] [--NAME VALUE ...]``
serves a model; every unknown ``--NAME VALUE`` is passed to ``from_pretrained`` with its value
parsed (True/False/None, numbers, JSON lists and objects, else a string).

``lmql-backends conformance [--model M] [--endpoint HOST:PORT] [--legacy-endpoint HOST:PORT] [FILES...]``
runs query files (or the built-in table) in-process, on the new and on the legacy backend and
compares them; exit status 0 when all agree, 1 on a difference, 2 when a query fails everywhere.

``lmql-backends migrate PATH [--dry-run]`` rewrites legacy-backend usage under PATH and prints
the unified diff (`--dry-run` writes nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .console import configure_console
from .errors import InvalidRequestError, LmqlBackendsError
from .loader import DTYPES, LOADERS, MATMUL_CHOICES, MODEL_IMPLS, parse_flag_value
from .process_env import apply_process_defaults


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmql-backends", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_run_parser(commands)
    demo = commands.add_parser("demo", help="serve the embedded model and run queries through both backends")
    demo.add_argument("--model", default=None, help="model to demo (default: the embedded builtin:tiny)")
    add_conformance_parser(commands)
    add_migrate_parser(commands)
    return parser


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve-model", help="serve a model over HTTP",
        description="Serve MODEL. Unknown --name value flags are passed to from_pretrained.",
    )
    serve.add_argument("model", help="hub id, local path, or builtin:tiny (the embedded model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--legacy", action="store_true", help="serve the legacy LMQL 0.0.6.x API")
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                       help="run the engine in a process of its own, or (--no-engine-process) in a thread of the "
                            "server process (default: a process for the new API, a thread for --legacy)")
    serve.add_argument("--cuda", action="store_true", help="use the GPU(s) if available (device_map=auto)")
    serve.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default float32 on CPU)")
    serve.add_argument("--loader", choices=LOADERS, default=None, help="transformers (default), awq or gptq")
    serve.add_argument("--tokenizer", default=None, help="load the tokenizer from here instead")
    serve.add_argument("--served-model-name", action="append", default=[], help="extra name(s) to answer to")
    serve.add_argument("--playground", action="store_true",
                       help="let the playground run queries (Python) on a non-loopback --host; on by default on loopback")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or LMQL_BACKENDS_API_KEY)")
    serve.add_argument("--cache-tokens", type=int, default=32768, help="prefix KV cache size in tokens")
    serve.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429")
    serve.add_argument("--kv-cache-bytes", type=parse_byte_size, default=None, metavar="SIZE",
                       help="most KV memory running requests and the prefix cache hold together, e.g. 512MiB or 2GB "
                            "(default: no bound beyond --cache-tokens and --max-num-seqs)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch threads of the engine (default: torch's default)")
    serve.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto",
                       help="forward pass: auto (our own for GPT-2 models, else transformers), native or transformers")
    serve.add_argument("--matmul", choices=MATMUL_CHOICES, default="auto",
                       help="matrix-product kernels of the native forward: auto (the faster of torch's BLAS and "
                            "oneDNN per layer and batch size, timed at start), blas or onednn")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                       help="largest request body accepted; larger ones get 413 (default 8 MiB)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template of /v1/chat/completions, for a model whose tokenizer has none "
                            "(or to replace its own)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let /v1/chat/completions requests send their own chat_template (Jinja run by the server)")
    serve.add_argument("--max-logprobs", type=int, default=20,
                       help="most alternatives a completion may ask for with logprobs (-1: the whole vocabulary)")
    serve.add_argument("--upstream", default=None, metavar="URL",
                       help="forward generation to this OpenAI-compatible server (vLLM, another serve-model) "
                            "instead of loading MODEL here; MODEL names the tokenizer (see docs/vllm.md)")
    serve.add_argument("--upstream-model", default=None,
                       help="the upstream's name of the model (default: MODEL if it serves it, else its only model)")
    serve.add_argument("--upstream-api-key", default=None,
                       help="the upstream's API key (or LMQL_BACKENDS_UPSTREAM_API_KEY)")
    serve.add_argument("--drain-seconds", type=float, default=5.0,
                       help="on SIGINT/SIGTERM, let running requests finish this long before cancelling (default 5)")


def add_run_parser(commands) -> None:
    run = commands.add_parser("run", help="run a query file or query text and print the results")
    run.add_argument("query", help="a .lmql file or the query text itself")
    run.add_argument("--model", default=None, help="model when the query has no from clause")


def add_conformance_parser(commands) -> None:
    conformance = commands.add_parser(
        "conformance", help="run queries in-process, on the new and on the legacy backend, and compare",
        description="Run each query on the three backends and print agreements and differences. "
                    "Servers are started on free loopback ports unless their endpoints are given. "
                    "Exit status: 0 all agree, 1 a difference, 2 a query failed on every backend.",
    )
    conformance.add_argument("files", nargs="*", help=".lmql query files or folders (default: the built-in table)")
    conformance.add_argument("--model", default="builtin:tiny",
                             help="model every query runs on, overriding its from clause (default builtin:tiny)")
    conformance.add_argument("--endpoint", default=None, help="HOST:PORT of a running new-API server of MODEL")
    conformance.add_argument("--legacy-endpoint", default=None, help="HOST:PORT of a running legacy server of MODEL")
    conformance.add_argument("--foreign", action=argparse.BooleanOptionalAction, default=None,
                             help="the --endpoint server is not lmql-backends (e.g. vLLM, or a serve-model --upstream "
                                  "front of vLLM): its seeded-sampling differences are expected (default: detected "
                                  "from its /v1/models owned_by)")


def add_migrate_parser(commands) -> None:
    migrate = commands.add_parser(
        "migrate", help="rewrite legacy-backend usage (.lmql, .py, shell) for the new backend",
        description="Remove backend=\"legacy\" decoder arguments and serve-model --legacy, mark legacy "
                    "endpoint URLs, and print the unified diff. See migration/MIGRATION.md.",
    )
    migrate.add_argument("path", help="a file or a folder to migrate")
    migrate.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")


#: what a unit of --kv-cache-bytes multiplies by (case-insensitive; a bare number is bytes)
BYTE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """Bytes from ``1073741824``, ``512MiB``, ``2GB``, ``1.5GiB`` or ``4G`` (K/M/G/T alone are powers of 1024,
    kB/MB/GB/TB powers of 1000); a bad value is an argparse error naming it and the accepted forms."""
    match = BYTE_SIZE.fullmatch(text)
    unit = match and BYTE_UNITS.get(match.group(2).lower())
    size = int(float(match.group(1)) * unit) if unit else 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size in bytes: give a positive integer of bytes (1073741824) or a number with a "
            f"unit: KiB, MiB, GiB, TiB (or K, M, G, T: powers of 1024) or kB, MB, GB, TB (powers of 1000), e.g. 512MiB"
        )
    return size


def run_conformance(args) -> int:
    from .conformance import ConformanceOptions, run_command

    options = ConformanceOptions(args.model, args.endpoint, args.legacy_endpoint, tuple(args.files), args.foreign)
    return run_command(options)


def run_migrate(args) -> int:
    from .migrate import run_command

    return run_command(args.path, args.dry_run)


def parse_passthrough(extra: list[str]) -> dict:
    """Turn ``--name value`` pairs (or ``--name=value``) into from_pretrained keywords."""
    kwargs, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise InvalidRequestError(f"unexpected argument {flag!r}; pass-through flags look like --name value")
        name, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise InvalidRequestError(f"flag --{name} needs a value, e.g. --{name} True")
            value, i = extra[i + 1], i + 1
        kwargs[name.replace("-", "_")] = parse_flag_value(value)
        i += 1
    return kwargs


def serve_model(args, extra: list[str]) -> None:
    from .engine import EngineConfig
    from .server.app import serve

    engine = EngineConfig(
        cache_tokens=args.cache_tokens, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
        num_threads=args.threads, model_impl=args.model_impl, matmul=args.matmul, kv_cache_bytes=args.kv_cache_bytes,
    )
    serve(
        args.model, host=args.host, port=args.port, legacy=args.legacy, api_key=args.api_key,
        upstream=make_upstream_config(args), max_logprobs=args.max_logprobs,
        served_model_names=tuple(args.served_model_name), engine=engine, max_body_bytes=args.max_body_bytes,
        drain_seconds=args.drain_seconds, engine_process=args.engine_process,
        chat_template=args.chat_template, trust_request_chat_template=args.trust_request_chat_template,
        playground=args.playground,
        cuda=args.cuda,
        dtype=args.dtype, loader=args.loader, tokenizer=args.tokenizer, **parse_passthrough(extra),
    )


def make_upstream_config(args):
    """The --upstream settings (None without --upstream)."""
    from .engine.upstream import API_KEY_ENV, UpstreamConfig

    if args.upstream is None:
        return None
    return UpstreamConfig(args.upstream, args.upstream_model, args.upstream_api_key or os.environ.get(API_KEY_ENV))


def run_query(args) -> None:
    from pathlib import Path

    from .runtime.api import execute, run_until_complete

    text = Path(args.query).read_text() if args.query.endswith(".lmql") else args.query
    kwargs = {"model": args.model} if args.model else {}
    results = run_until_complete(lambda: execute(text, **kwargs))
    for result in results if isinstance(results, list) else [results]:
        print(result.prompt)
        for name, value in result.variables.items():
            print(f"  {name} = {value!r}")
        if result.return_value is not None:
            print(f"  return value: {result.return_value!r}")


def main(argv: list[str] | None = None) -> int:
    apply_process_defaults(os.environ)  # before any command imports torch
    configure_console()
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "serve-model":
            serve_model(args, extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        elif args.command == "run":
            run_query(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.model)
        elif args.command == "conformance":
            return run_conformance(args)
        elif args.command == "migrate":
            return run_migrate(args)
    except LmqlBackendsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
