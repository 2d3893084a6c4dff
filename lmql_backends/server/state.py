"""What every server module shares: the server's configuration, its state and the app keys."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from ..engine import Engine, EngineConfig
from ..engine.process import EngineProcess
from ..engine.upstream import UpstreamConfig, UpstreamEngine
from ..errors import InvalidRequestError
from ..loader import LoadedModel
from .validation import is_positive_int

#: the environment variable holding the API key when none is given
API_KEY_ENV = "LMQL_BACKENDS_API_KEY"
STATE = web.AppKey("state", object)
#: functions returning a dataclass of extra /metrics gauges (the protocol modules add theirs)
METRICS_SOURCES = web.AppKey("metrics_sources", list)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `serve-model` needs besides the model's load options."""

    host: str = "127.0.0.1"
    port: int = 8080
    legacy: bool = False
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    drain_seconds: float = 5.0
    engine: EngineConfig = EngineConfig()
    #: run the engine in a process of its own (engine/process.py) or in a thread of this one;
    #: None: a process for the new API (many streams), a thread for the legacy API (one round trip per token)
    engine_process: bool | None = None
    #: the Jinja chat template of /v1/chat/completions (None: the tokenizer's own)
    chat_template: str | None = None
    #: take a request's own chat_template (Jinja that runs in the server; off by default, as in vLLM)
    trust_request_chat_template: bool = False
    #: run playground queries (Python) even when the server binds a non-loopback address
    playground: bool = False
    #: forward generation to this OpenAI-compatible server instead of loading the model (--upstream)
    upstream: UpstreamConfig | None = None
    #: the most alternatives a completion may ask for with `logprobs` (-1: the whole vocabulary)
    max_logprobs: int = 20

    @property
    def is_engine_process(self) -> bool:
        return (not self.legacy) if self.engine_process is None else self.engine_process

    def __post_init__(self):
        if not is_positive_int(self.max_body_bytes):
            raise InvalidRequestError(
                f"max_body_bytes must be a positive number of bytes, got {self.max_body_bytes!r}", "max_body_bytes"
            )
        if not isinstance(self.drain_seconds, (int, float)) or not self.drain_seconds >= 0:
            raise InvalidRequestError(
                f"drain_seconds must be a number of seconds >= 0, got {self.drain_seconds!r}", "drain_seconds"
            )
        if self.upstream is not None and self.engine.kv_cache_bytes is not None:
            raise InvalidRequestError(
                "kv_cache_bytes (--kv-cache-bytes) bounds this server's own KV memory, but with --upstream the "
                "upstream runs the model and owns its memory: drop --kv-cache-bytes and set the upstream's own limit "
                "(vLLM: --gpu-memory-utilization, or VLLM_CPU_KVCACHE_SPACE on CPU)", "kv_cache_bytes",
            )
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < -1:
            raise InvalidRequestError(
                f"max_logprobs must be an integer >= 0, or -1 for the whole vocabulary, got {self.max_logprobs!r}",
                "max_logprobs",
            )

    def logprobs_limit(self, vocab_size: int) -> int:
        """The largest `logprobs` a completion may ask for on a model of `vocab_size` tokens."""
        return vocab_size if self.max_logprobs == -1 else self.max_logprobs


@dataclasses.dataclass
class ServerState:
    """What every handler can reach: the model string, the loaded model and the engine."""

    model_name: str
    loaded: LoadedModel
    engine: Engine | EngineProcess | UpstreamEngine
    config: ServerConfig

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.config.served_model_names)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]
