"""Fixtures of the conformance suite: the three backends on the embedded model and on a Llama model.

The Llama model is the config-built random-weight one of ``llama_model_dir``. Its config says
512 positions; the table has a ~600-token prompt, so every backend loads it with
``max_position_embeddings=1024`` (a ``from_pretrained`` keyword: same weights, longer RoPE window).
"""

from __future__ import annotations

import dataclasses

import pytest

from lmql_backends.conformance import BackendTarget, make_targets

LLAMA_LOAD_KWARGS = {"max_position_embeddings": 1024}


@dataclasses.dataclass(frozen=True)
class ModelBackends:
    """The three backends of one model and the tokenizer used to report token positions."""

    label: str
    targets: tuple[BackendTarget, ...]
    tokenizer: object


@pytest.fixture(scope="session")
def llama_new_server(llama_model_dir):
    """The Llama model behind the new API on a free loopback port."""
    from lmql_backends import serve

    handle = serve(llama_model_dir, port=0, background=True, **LLAMA_LOAD_KWARGS)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def llama_legacy_server(llama_model_dir):
    """The Llama model behind the legacy API on a free loopback port."""
    from lmql_backends import serve

    handle = serve(llama_model_dir, port=0, legacy=True, background=True, **LLAMA_LOAD_KWARGS)
    yield handle
    handle.stop()


def make_backends(label: str, model: str, new_server, legacy_server, **load_kwargs) -> ModelBackends:
    from lmql_backends.runtime.models import shared_tokenizer

    targets = make_targets(model, new_server.endpoint, legacy_server.endpoint, **load_kwargs)
    return ModelBackends(label, targets, shared_tokenizer(model))


@pytest.fixture(scope="session", params=["tiny", "llama"])
def backends(request) -> ModelBackends:
    """In-process, new and legacy backends, on the embedded model and then on the Llama model."""
    if request.param == "tiny":
        model = request.getfixturevalue("tiny_model")
        return make_backends("tiny", model, request.getfixturevalue("new_server"),
                             request.getfixturevalue("legacy_server"))
    model = request.getfixturevalue("llama_model_dir")
    return make_backends("llama", model, request.getfixturevalue("llama_new_server"),
                         request.getfixturevalue("llama_legacy_server"), **LLAMA_LOAD_KWARGS)
