"""lmql-backends: serve local Hugging Face causal LMs to LMQL-style constrained queries.

Public surface::

    run, run_sync, query      run queries (async, sync, decorator)
    model, inprocess          name the model a query runs on (server endpoint or in-process)
    score, score_sync         score options for a prompt (the distribution clause)
    argmax, sample, beam      decoders, e.g. run(query, decoder=sample(n=2, seed=1))
    serve                     serve a model over HTTP (new API, or legacy with legacy=True)
    errors                    the exception hierarchy

Names are imported on first use, so ``import lmql_backends`` stays light, and importing it
changes nothing in the process (no environment variables, no thread settings).
"""

from importlib import import_module

from . import errors

__version__ = "0.1.0"

_EXPORTS = {
    "run": "runtime.api", "run_sync": "runtime.api", "query": "runtime.api", "score": "runtime.api",
    "score_sync": "runtime.api", "argmax": "runtime.decoders", "sample": "runtime.decoders", "beam": "runtime.decoders",
    "model": "runtime.models", "inprocess": "runtime.models", "serve": "server.app",
}

__all__ = [
    "run", "run_sync", "query", "model", "inprocess", "score", "score_sync", "argmax", "sample", "beam",
    "serve", "errors", "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lmql_backends' has no attribute {name!r}")
