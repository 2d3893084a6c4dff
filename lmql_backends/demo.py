"""``lmql-backends demo``: the embedded model served on loopback, the same queries through
the new API, the legacy API and in-process, printed side by side with tokens/s."""

from __future__ import annotations

import dataclasses
import time

from .models import TINY_MODEL_NAME

DEMO_QUERIES = (
    'argmax "Hello[WHO]" from {model} where STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10',
    'argmax "The house was [ADJ]" from {model} where ADJ in [" large", " small", " quiet"]',
    'argmax "She was [AGE: int] years old and [REST]" from {model} where len(TOKENS(REST)) < 8',
)


@dataclasses.dataclass
class DemoRow:
    query: int
    backend: str
    variables: dict
    seconds: float
    num_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


def model_expressions(model: str, new_endpoint: str, legacy_endpoint: str) -> dict[str, tuple[str, dict]]:
    """Backend name -> (model expression for the from clause, decoder arguments)."""
    return {
        "new API": (f'lmql.model("{model}", endpoint="{new_endpoint}")', {}),
        "legacy API": (f'lmql.model("{model}", endpoint="{legacy_endpoint}")', {"backend": "legacy"}),
        "in-process": (f'"local:{model}"', {}),
    }


def with_decoder_args(query: str, args: dict) -> str:
    if not args:
        return query
    rendered = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return query.replace("argmax ", f"argmax({rendered}) ", 1)


def count_tokens(tokenizer, variables: dict) -> int:
    texts = [str(v) for v in variables.values()]
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)


def run_rows(model: str, backends: dict, tokenizer) -> list[DemoRow]:
    from .runtime.api import run_sync

    rows = []
    for number, template in enumerate(DEMO_QUERIES, 1):
        for backend, (expression, decoder_args) in backends.items():
            query = with_decoder_args(template.format(model=expression), decoder_args)
            start = time.perf_counter()
            result = run_sync(query)
            seconds = time.perf_counter() - start
            rows.append(DemoRow(number, backend, result.variables, seconds, count_tokens(tokenizer, result.variables)))
    return rows


def print_rows(rows: list[DemoRow]) -> None:
    print(f"{'#':<3}{'backend':<12}{'tok/s':>8}  variables")
    for row in rows:
        print(f"{row.query:<3}{row.backend:<12}{row.tokens_per_second:>8.1f}  {row.variables!r}")
    by_query: dict[int, list] = {}
    for row in rows:
        by_query.setdefault(row.query, []).append(row.variables)
    agree = all(all(v == values[0] for v in values) for values in by_query.values())
    print("all backends agree" if agree else "BACKENDS DISAGREE")


def run_demo(model: str | None = None) -> None:
    """Serve `model` (default: the embedded model) on free loopback ports and compare backends."""
    from .loader import load_model
    from .server.app import serve

    model = model or TINY_MODEL_NAME
    print(f"loading {model} ...", flush=True)
    tokenizer = load_model(model).tokenizer
    new_server = serve(model, port=0, background=True)
    legacy_server = serve(model, port=0, legacy=True, background=True)
    try:
        print(f"new API on http://{new_server.endpoint}, legacy API on http://{legacy_server.endpoint}\n")
        backends = model_expressions(model, new_server.endpoint, legacy_server.endpoint)
        print_rows(run_rows(model, backends, tokenizer))
    finally:
        new_server.stop()
        legacy_server.stop()
