"""The typed /v1/completions request (server/openai/completions.py), parsed directly from bodies."""

from __future__ import annotations

import types

import pytest

from lmql_backends.engine import EngineConfig
from lmql_backends.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
from lmql_backends.loader import load_model
from lmql_backends.server.openai.completions import CompletionRequest, decode_json_body, make_choice_plans
from lmql_backends.server.state import ServerConfig, ServerState

pytestmark = pytest.mark.timeout(60)

MODEL = "builtin:tiny"


@pytest.fixture(scope="module")
def state() -> ServerState:
    """The state the parser reads: the served names and the loaded model (no engine runs here)."""
    engine = types.SimpleNamespace(config=EngineConfig(max_num_seqs=2, max_queue=2))
    return ServerState(MODEL, load_model(MODEL), engine, ServerConfig(served_model_names=("alias",)))


def parse(state, **fields) -> CompletionRequest:
    return CompletionRequest.from_json({"model": MODEL, "prompt": "Hello", **fields}, state)


def test_a_string_prompt_becomes_its_token_ids_without_special_tokens(state):
    completion = parse(state, prompt="Hello world", max_tokens=4, n=2, stop="\n")
    ids = tuple(state.loaded.tokenizer.encode("Hello world", add_special_tokens=False))
    assert completion.prompts == (ids,) and completion.max_tokens == 4 and completion.stop == ("\n",)
    assert completion.num_choices == 2 and completion.num_prompt_tokens == len(ids)


def test_every_prompt_form_gives_token_id_tuples(state):
    assert parse(state, prompt=[3, 4]).prompts == ((3, 4),)
    assert parse(state, prompt=[[3], [4, 5]]).prompts == ((3,), (4, 5))
    assert len(parse(state, prompt=["a", "b"]).prompts) == 2


def test_an_alias_is_a_served_model_and_anything_else_is_404(state):
    assert parse(state, model="alias").model == "alias"
    with pytest.raises(ModelNotFoundError, match="'gpt2' does not exist"):
        parse(state, model="gpt2")


@pytest.mark.parametrize("fields, param", [
    ({"prompt": [1, True]}, "prompt"), ({"prompt": [1, 2048]}, "prompt"), ({"n": True}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": "1"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "\ud800"}, "prompt"), ({"prompt": ""}, "prompt"), ({"best_of": 2}, "best_of"),
])
def test_each_bad_value_names_its_parameter(state, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        parse(state, **fields)
    assert info.value.param == param


def test_a_prompt_without_room_for_max_tokens_is_a_context_length_error(state):
    context = state.loaded.context_length
    assert parse(state, prompt=[1] * (context - 3), max_tokens=3).max_tokens == 3
    with pytest.raises(ContextLengthError, match=f"context length of {context}"):
        parse(state, prompt=[1] * (context - 3), max_tokens=4)


def test_choice_plans_seed_each_choice_and_refuse_more_than_the_engine_holds(state):
    plans = make_choice_plans(parse(state, prompt=[[1], [2]], n=2, seed=7), state)
    assert [p.index for p in plans] == [0, 1, 2, 3] and [p.prompt_ids for p in plans] == [(1,), (1,), (2,), (2,)]
    assert [p.request.sampling.seed for p in plans] == [7, 8, 7, 8]
    with pytest.raises(InvalidRequestError, match="more than this server can hold"):
        make_choice_plans(parse(state, prompt=[[1], [2], [3]], n=2), state)


def test_a_body_that_is_not_json_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        decode_json_body(b"{")
    assert decode_json_body(b'{"a": 1}') == {"a": 1}
