"""The messages between a server and its engine process: tensors, processors and errors survive."""

from __future__ import annotations

import torch

from lmql_backends.engine.sampling import make_bias_processor
from lmql_backends.sampling import make_mask_processor
from lmql_backends.engine.sequence import ErrorOutput, PromptOutput, Request
from lmql_backends.engine.wire import dumps, loads
from lmql_backends.errors import ContextLengthError, QuerySyntaxError


def roundtrip(obj):
    return loads(dumps(obj))


def test_tensors_cross_with_their_values_and_dtype():
    for tensor in (torch.randn(50), torch.tensor([True, False]), torch.arange(5)):
        back = roundtrip(PromptOutput(3, 0, logits=tensor)).logits
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_bfloat16_tensors_cross_as_float32():
    tensor = torch.randn(8).bfloat16()
    back = roundtrip(tensor)
    assert back.dtype == torch.float32 and torch.equal(back, tensor.float())


def test_processors_cross_and_still_work():
    logits = torch.zeros(6)
    request = Request([1, 2], processors=(make_bias_processor({2: 1.5}), make_mask_processor(torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool))))
    bias, mask = roundtrip(request).processors
    assert bias((), logits)[2] == 1.5
    assert torch.isneginf(mask((), logits)).tolist() == [False, True, False, False, True, False]


def test_errors_keep_their_type_and_fields():
    error = roundtrip(ErrorOutput(ContextLengthError("too long", "max_tokens"))).error
    assert type(error) is ContextLengthError and str(error) == "too long" and error.param == "max_tokens"
    syntax = roundtrip(QuerySyntaxError("bad", line=2, column=5))
    assert (syntax.line, syntax.column, str(syntax)) == (2, 5, "bad (line 2, column 5)")
