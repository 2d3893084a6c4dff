"""The shared model loader: the only place that calls ``from_pretrained``.

Every backend (new server, legacy server, in-process models) loads through
:func:`load_model`, which returns one typed :class:`LoadedModel` and loads each
model once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, MissingExtraError, ModelLoadError
from .models import TINY_MODEL_DIR, TINY_MODEL_NAME

log = logging.getLogger("lmql_backends.loader")

DTYPES = ("auto", "float32", "float16", "bfloat16", "8bit", "4bit")
LOADERS = ("transformers", "awq", "gptq")
#: which forward pass the engine runs a loaded model with (--model-impl; see engine/runner.py make_forward)
MODEL_IMPLS = ("auto", "native", "transformers")
#: the native forward's matrix-product kernels (--matmul): "auto" (the faster per layer shape and
#: row count, timed at start), "blas" or "onednn" (see engine/linear_kernels.py)
MATMUL_CHOICES = ("auto", "blas", "onednn")
# loader -> (importable module, pip extra)
LOADER_PACKAGES = {"awq": ("awq", "awq"), "gptq": ("gptqmodel", "gptq")}
DEFAULT_CONTEXT_LENGTH = 2048


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """InvalidRequestError naming `value` unless it is one of `choices` (an engine setting called `name`)."""
    if value not in choices:
        raise InvalidRequestError(f"{name} must be one of {', '.join(choices)}, got {value!r}", name)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How to load a model: every keyword the CLI, ``serve`` and ``model`` accept."""

    tokenizer: str | None = None
    cuda: bool = False
    dtype: str | None = None
    loader: str | None = None
    from_pretrained_kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, tokenizer=None, cuda=False, dtype=None, loader=None, **kwargs) -> "LoadOptions":
        """Build options from keyword arguments; unknown keywords go to ``from_pretrained``."""
        if dtype is not None and str(dtype) not in DTYPES:
            raise InvalidRequestError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", "dtype")
        if loader is not None and loader not in LOADERS:
            raise InvalidRequestError(f"loader {loader!r} is not one of {', '.join(LOADERS)}", "loader")
        items = tuple(sorted(kwargs.items()))
        return cls(tokenizer, bool(cuda), None if dtype is None else str(dtype), loader, items)

    def cache_key(self, name: str) -> str:
        return json.dumps([name, dataclasses.asdict(self)], sort_keys=True, default=repr)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model with everything the engine and the clients need to know about it."""

    name: str
    model: Any
    tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int
    context_length: int
    device: str
    dtype: str

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


_loaded: dict[str, LoadedModel] = {}
_lock = threading.Lock()


def resolve_model_path(name: str) -> str:
    """Map the reserved embedded-model name to its directory; other names pass through."""
    if name.startswith("local:"):
        name = name[len("local:"):]
    if name == TINY_MODEL_NAME:
        return str(TINY_MODEL_DIR)
    if name.startswith("builtin:"):
        raise ModelLoadError(f"unknown embedded model {name!r}; the only one is {TINY_MODEL_NAME!r}")
    return name


def load_model(name: str, options: LoadOptions | None = None, **kwargs) -> LoadedModel:
    """Load `name` (hub id, local path or ``builtin:tiny``) once per process and return it."""
    options = options or LoadOptions.make(**kwargs)
    key = options.cache_key(name)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load_uncached(name, options)
        return _loaded[key]


def load_tokenizer(name: str, tokenizer: str | None = None):
    """Load only the tokenizer of `name` (clients use it to tokenize locally)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(tokenizer or name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; keep its message
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {exc}") from exc


def load_config(name: str):
    """The model config of `name`, read locally without the weights (None when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except Exception:  # a model whose files are not here: callers fall back to what a server says
        return None


@functools.lru_cache(maxsize=64)
def load_context_length(name: str) -> int | None:
    """The context length from a model's config, read locally (None when it cannot be read).

    The legacy protocol has no way to ask the server; its clients always loaded the model's
    files locally from the model string (for the tokenizer), so the config is there too.
    Read once per process and name (each query makes a new client; reading takes milliseconds).
    """
    config = load_config(name)
    return None if config is None else context_length(config)  # None: decoders then rely on the server's 400


def _load_uncached(name: str, options: LoadOptions) -> LoadedModel:
    loaded = with_tokenizer(load_weights(name, options), load_tokenizer(name, options.tokenizer))
    log.debug(describe(loaded))
    return loaded


def load_weights(name: str, options: LoadOptions) -> LoadedModel:
    """Load the model alone (no tokenizer; BOS/EOS from its config): what an engine process needs.
    Not cached: `load_model` is the cached entry point."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    kwargs = make_from_pretrained_kwargs(path, options)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (ImportError, ModuleNotFoundError) as exc:
        raise MissingExtraError(f"loading {name!r} needs a missing package: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    model.eval()
    return make_loaded_model(name, model)


def make_from_pretrained_kwargs(path: str, options: LoadOptions) -> dict[str, Any]:
    """Turn load options into ``from_pretrained`` keyword arguments."""
    kwargs = dict(options.from_pretrained_kwargs)
    quant_method = detect_quant_method(path)
    check_loader_packages(options.loader or quant_method)
    kwargs.update(dtype_kwargs(options.dtype, kwargs))
    if options.cuda and "device_map" not in kwargs:
        if is_cuda_available():
            kwargs["device_map"] = "auto"
        else:
            warnings.warn("cuda=True (--cuda): no GPU is available, loading the model on the CPU", stacklevel=2)
    return kwargs


def dtype_kwargs(dtype: str | None, user_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The dtype / quantization keywords for a --dtype value (float32 on CPU by default)."""
    import torch

    if dtype in ("8bit", "4bit"):
        check_package("bitsandbytes", "bnb", f"--dtype {dtype}")
        from transformers import BitsAndBytesConfig

        bits = {"load_in_8bit": True} if dtype == "8bit" else {"load_in_4bit": True}
        return {"quantization_config": BitsAndBytesConfig(**bits)}
    if dtype == "auto":
        return {"dtype": "auto"}
    if dtype is not None:
        return {"dtype": getattr(torch, dtype)}
    if "dtype" in user_kwargs or "torch_dtype" in user_kwargs:
        return {}
    return {"dtype": torch.float32}


def detect_quant_method(path: str) -> str | None:
    """The ``quant_method`` of a local model's ``quantization_config`` (awq, gptq, ...), if any."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    return str(method).lower() if method else None


def check_loader_packages(loader: str | None) -> None:
    """Fail early, naming the extra to install, when an AWQ/GPTQ package is missing."""
    if loader in LOADER_PACKAGES:
        module, extra = LOADER_PACKAGES[loader]
        check_package(module, extra, f"--loader {loader}")


def check_package(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{what} needs the package {module!r}, which is not installed: "
            f"pip install 'lmql-backends[{extra}]'"
        )


def is_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_loaded_model(name: str, model) -> LoadedModel:
    """Collect the facts about a loaded model that the engine and clients need (no tokenizer yet)."""
    param = next(model.parameters())
    return LoadedModel(
        name=name, model=model, tokenizer=None, bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id, vocab_size=output_vocab_size(model),
        context_length=context_length(model.config), device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
    )


def with_tokenizer(loaded: LoadedModel, tokenizer) -> LoadedModel:
    """`loaded` with its tokenizer, whose BOS/EOS ids win over the model config's."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else loaded.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else loaded.eos_token_id
    return dataclasses.replace(loaded, tokenizer=tokenizer, bos_token_id=bos, eos_token_id=eos)


def output_vocab_size(model) -> int:
    embeddings = model.get_output_embeddings()
    return int(embeddings.weight.shape[0]) if embeddings is not None else int(model.config.vocab_size)


def context_length(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT_LENGTH


def describe(loaded: LoadedModel) -> str:
    """The one-line summary printed when a model is ready."""
    device_map = getattr(loaded.model, "hf_device_map", None) or loaded.device
    num_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return (
        f"loaded {loaded.name}: {loaded.num_parameters / 1e6:.1f}M parameters, {loaded.dtype}, "
        f"device {device_map}, {num_bytes / 2**20:.0f} MiB, context {loaded.context_length}, "
        f"vocab {loaded.vocab_size}" + "".join(f", {k}={v}" for k, v in visible_env().items())
    )


def parse_flag_value(text: str) -> Any:
    """Parse a ``--name value`` flag value: True/False/None, ints, floats, JSON, else the string."""
    literals = {"True": True, "true": True, "False": False, "false": False, "None": None, "null": None}
    if text in literals:
        return literals[text]
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text[:1] in "[{\"":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"flag value {text!r} looks like JSON but does not parse: {exc}")
    return text


def visible_env() -> dict[str, str]:
    """Environment facts that change where a model loads (shown in the load summary)."""
    return {k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES"}
