"""The shared loader: options, dtypes, --cuda fallback, quantization detection, pass-through."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmql_backends import loader
from lmql_backends.errors import InvalidRequestError, MissingExtraError, ModelLoadError
from lmql_backends.loader import (
    LoadOptions, load_model, load_weights, make_from_pretrained_kwargs, parse_flag_value, with_tokenizer,
)


@pytest.mark.parametrize("text, value", [
    ("True", True), ("False", False), ("None", None), ("12", 12), ("0.5", 0.5),
    ('{"0": "20GiB"}', {"0": "20GiB"}), ("[1, 2]", [1, 2]), ("main", "main"),
])
def test_parse_flag_value(text, value):
    assert parse_flag_value(text) == value


def test_parse_flag_value_bad_json_names_value():
    with pytest.raises(InvalidRequestError, match=r"\{oops"):
        parse_flag_value("{oops")


def test_options_reject_unknown_dtype_and_loader():
    with pytest.raises(InvalidRequestError, match="float8"):
        LoadOptions.make(dtype="float8")
    with pytest.raises(InvalidRequestError, match="exllama"):
        LoadOptions.make(loader="exllama")


def test_cpu_default_is_float32_and_user_dtype_wins(gpt2_model_dir):
    assert make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make())["dtype"] is torch.float32
    kwargs = make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make(dtype="bfloat16"))
    assert kwargs["dtype"] is torch.bfloat16
    assert make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make(dtype="auto"))["dtype"] == "auto"


def test_cuda_without_gpu_warns_and_loads_on_cpu(gpt2_model_dir, monkeypatch):
    monkeypatch.setattr(loader, "is_cuda_available", lambda: False)
    with pytest.warns(UserWarning, match="no GPU"):
        kwargs = make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make(cuda=True))
    assert "device_map" not in kwargs


def test_cuda_with_gpu_uses_device_map_auto_but_never_overrides_users(gpt2_model_dir, monkeypatch):
    monkeypatch.setattr(loader, "is_cuda_available", lambda: True)
    assert make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make(cuda=True))["device_map"] == "auto"
    own = LoadOptions.make(cuda=True, device_map={"": "cpu"})
    assert make_from_pretrained_kwargs(gpt2_model_dir, own)["device_map"] == {"": "cpu"}


@pytest.mark.parametrize("method, extra", [("awq", "awq"), ("gptq", "gptq")])
def test_quantized_config_is_detected_and_missing_package_names_extra(tmp_path, method, extra, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": method}}))
    assert loader.detect_quant_method(str(tmp_path)) == method
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=rf"lmql-backends\[{extra}\]"):
        make_from_pretrained_kwargs(str(tmp_path), LoadOptions.make())
    with pytest.raises(MissingExtraError, match=rf"--loader {method}"):
        make_from_pretrained_kwargs(str(tmp_path), LoadOptions.make(loader=method))


@pytest.mark.parametrize("dtype", ["8bit", "4bit"])
def test_bitsandbytes_dtypes_need_the_bnb_extra(gpt2_model_dir, dtype, monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"lmql-backends\[bnb\]"):
        make_from_pretrained_kwargs(gpt2_model_dir, LoadOptions.make(dtype=dtype))


def test_embedded_model_loads_once_per_process(tiny_model):
    first = load_model(tiny_model)
    assert load_model(tiny_model) is first
    assert first.vocab_size == first.model.get_output_embeddings().weight.shape[0]
    assert first.bos_token_id is not None and first.eos_token_id is not None
    assert first.context_length == 1024 and first.dtype == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_load_and_run(llama_model_dir, dtype):
    loaded = load_model(llama_model_dir, dtype=dtype)
    assert loaded.dtype == dtype
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == getattr(torch, dtype) and torch.isfinite(logits).all()


def test_unknown_from_pretrained_keyword_fails_at_load_with_transformers_message(gpt2_model_dir):
    with pytest.raises(ModelLoadError, match="no_such_argument"):
        load_model(gpt2_model_dir, no_such_argument=1)


def test_reserved_prefix_never_falls_through_to_the_hub():
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        load_model("builtin:huge")


def test_weights_load_without_a_tokenizer_and_the_tokenizers_bos_eos_win(gpt2_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "bos_token_id": 5, "eos_token_id": 7}))
    weights = load_weights(str(model_dir), LoadOptions())  # what an engine process loads
    assert weights.tokenizer is None and (weights.bos_token_id, weights.eos_token_id) == (5, 7)
    full = load_model(str(model_dir))
    tokenizer_ids = (full.tokenizer.bos_token_id, full.tokenizer.eos_token_id)
    assert None not in tokenizer_ids and tokenizer_ids != (5, 7)
    assert (full.bos_token_id, full.eos_token_id) == tokenizer_ids
    assert with_tokenizer(weights, full.tokenizer).eos_token_id == full.eos_token_id
