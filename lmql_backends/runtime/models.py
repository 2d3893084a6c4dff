"""Which model a query runs on, and the `LMClient` that reaches it.

``"local:NAME"`` runs NAME in this process (loaded once per process by the shared loader);
any other name is a model served by an lmql-backends server at `endpoint` (default
``localhost:8080``), reached through the new OpenAI-like API or, with ``backend="legacy"``,
the legacy per-token API.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ..errors import InvalidRequestError
from ..loader import LoadOptions

LOCAL_PREFIX = "local:"
DEFAULT_MODEL = "local:builtin:tiny"
DEFAULT_ENDPOINT = "localhost:8080"
BACKENDS = (None, "legacy")

_tokenizers: dict[tuple[str, str | None], Any] = {}
_tokenizers_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to run queries on: its name, where it is served, and how to load it."""

    name: str
    endpoint: str | None = None
    api_key: str | None = None
    options: LoadOptions = LoadOptions()

    @property
    def is_inprocess(self) -> bool:
        return self.name.startswith(LOCAL_PREFIX)

    @property
    def local_name(self) -> str:
        """The name given to the loader (without ``local:``)."""
        return self.name[len(LOCAL_PREFIX):] if self.is_inprocess else self.name


def model(name: str, endpoint: str | None = None, api_key: str | None = None, **load_kwargs) -> ModelSpec:
    """Name a model: ``"local:NAME"`` runs in-process, any other name is served at `endpoint`.

    For in-process models `load_kwargs` (cuda, dtype, loader, tokenizer, or any
    ``from_pretrained`` keyword) say how to load it; a served model only takes `tokenizer`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"a model name must be a non-empty string, got {name!r}", "model")
    is_local = name.startswith(LOCAL_PREFIX)
    if is_local and (endpoint is not None or api_key is not None):
        raise InvalidRequestError(
            f"model {name!r} runs in-process and takes no endpoint or api_key; drop 'local:' to use a server", "endpoint"
        )
    extra = sorted(set(load_kwargs) - {"tokenizer"})
    if not is_local and extra:
        raise InvalidRequestError(
            f"{extra[0]!r} only applies to in-process models; pass it to the server, or use 'local:{name}'", extra[0]
        )
    return ModelSpec(name, endpoint, api_key, LoadOptions.make(**load_kwargs))


def inprocess(name: str, **load_kwargs) -> ModelSpec:
    """The model `name` running in this process: ``model("local:" + name, ...)``."""
    return model(LOCAL_PREFIX + name, **load_kwargs)


def as_model_spec(value: "str | ModelSpec | None") -> ModelSpec:
    """A model given as a string, a ModelSpec or None (the embedded model, in-process)."""
    if value is None:
        return model(DEFAULT_MODEL)
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        return model(value)
    raise InvalidRequestError(f"a model must be a string or lmql_backends.model(...), got {value!r}", "model")


def make_client(model_: "str | ModelSpec | None", backend: str | None = None, chunk_timeout: float = 30.0):
    """The LMClient for a model: in-process for ``local:`` names, else an HTTP client."""
    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend {backend!r} is not known; use backend='legacy' or leave it out", "backend")
    spec = as_model_spec(model_)
    if spec.is_inprocess:
        from ..client.inprocess import InProcessClient

        return InProcessClient(spec.local_name, spec.options)
    return make_http_client(spec, backend, chunk_timeout)


def make_http_client(spec: ModelSpec, backend: str | None, chunk_timeout: float):
    endpoint = spec.endpoint or DEFAULT_ENDPOINT
    tokenizer = shared_tokenizer(spec.name, spec.options.tokenizer)
    if backend == "legacy":
        from ..client.legacy_client import LegacyClient

        return LegacyClient(spec.name, endpoint, tokenizer, api_key=spec.api_key, chunk_timeout=chunk_timeout)
    from ..client.openai_client import OpenAIClient

    return OpenAIClient(spec.name, endpoint, tokenizer, api_key=spec.api_key, chunk_timeout=chunk_timeout)


def shared_tokenizer(name: str, tokenizer: str | None = None):
    """The tokenizer of a served model, loaded once per process (its token table is cached with it)."""
    from ..loader import load_tokenizer

    key = (name, tokenizer)
    with _tokenizers_lock:
        if key not in _tokenizers:
            _tokenizers[key] = load_tokenizer(name, tokenizer)
        return _tokenizers[key]
