"""The runner's own forward pass for GPT-2 models (the family of LMQL's default model).

transformers' GPT-2 forward spends most of a small model's step in Python (cache objects,
mask building, attention dispatch) rather than in its arithmetic. As serving engines do (vLLM's `--model-impl`), the runner can run
the same weights through a lean forward of its own: the same operations in the same order
(layer norm, fused QKV projection, scaled dot-product attention, GELU MLP, tied LM head),
writing keys and values straight into the runner's `KVStore`. Its logits equal transformers'
to float rounding (tests/engine/test_native_gpt2.py compares them on every kind of pass).

Used for plain `GPT2LMHeadModel`s only (see `unsupported_reason`); any other model, and any
GPT-2 loaded through a quantizing loader or split across devices, runs through transformers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .kv_attention import shared_prefix_attention
from .linear_kernels import Linear


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as one fused torch operation."""
    return F.gelu(x, approximate="tanh")


#: activations transformers computes op by op that torch has as one fused operation (same formula)
FUSED_ACTIVATIONS = {"gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu}
#: transformers' GPT-2 feature flags this forward does not implement
UNSUPPORTED_FLAGS = ("add_cross_attention", "reorder_and_upcast_attn")


def unsupported_reason(model) -> str | None:
    """Why `model` cannot run through `NativeGpt2Forward` (None: it can)."""
    from transformers.pytorch_utils import Conv1D

    config = model.config
    if type(model).__name__ != "GPT2LMHeadModel":
        return f"the model is a {type(model).__name__}, not a GPT2LMHeadModel"
    flags = [flag for flag in UNSUPPORTED_FLAGS if getattr(config, flag, False)]
    if flags:
        return f"the model's config sets {', '.join(flags)}"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "the model is split across devices (device_map)"
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "accelerate hooks move the model's weights (offloading)"
    layers = [layer for block in model.transformer.h
              for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    if not all(type(layer) is Conv1D and layer.weight.is_floating_point() for layer in layers):
        return "the model's projections are not plain Conv1D layers (a quantizing loader replaced them)"
    return None


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """The tensors and settings of one transformer block."""

    ln_1: tuple  # layer norm (shape, weight, bias, eps)
    qkv: Linear
    out: Linear
    ln_2: tuple
    fc: Linear
    proj: Linear
    act: object  # tensor -> tensor
    scale: float

    @classmethod
    def of(cls, block, index: int, config) -> "BlockWeights":
        attn, mlp = block.attn, block.mlp
        return cls(
            norm_args(block.ln_1), conv1d_linear(attn.c_attn), conv1d_linear(attn.c_proj),
            norm_args(block.ln_2), conv1d_linear(mlp.c_fc), conv1d_linear(mlp.c_proj),
            FUSED_ACTIVATIONS.get(config.activation_function, mlp.act),
            attention_scale(config, attn.head_dim, index),
        )


def conv1d_linear(conv1d) -> Linear:
    """GPT-2's Conv1D (x @ weight + bias, weight stored [in, out]) as a `Linear` on its own tensors."""
    return Linear(conv1d.weight, conv1d.bias)


def norm_args(norm: torch.nn.LayerNorm) -> tuple:
    """What torch.layer_norm needs from a LayerNorm module (calling the module costs more than the norm)."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


def attention_scale(config, head_dim: int, index: int) -> float:
    """The factor of q·k, as transformers' GPT-2 attention computes it."""
    scale = 1 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
    return scale / (index + 1) if config.scale_attn_by_inverse_layer_idx else scale


class NativeGpt2Forward:
    """`forward(...)` of a loaded GPT2LMHeadModel over the runner's KV stores."""

    #: it reads a prefix shared by the batch's rows once per step (see kv_attention)
    shares_prefixes = True

    def __init__(self, model):
        config = model.config  # the caller checked unsupported_reason(model)
        self.num_heads, self.width = config.n_head, config.n_embd
        self.head_dim = self.width // self.num_heads
        self.wte, self.wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        self.ln_f = norm_args(model.transformer.ln_f)
        self.lm_head = Linear(model.lm_head.weight.t())  # [vocab, width] seen as [in, out]
        self.blocks = [BlockWeights.of(block, i, config) for i, block in enumerate(model.transformer.h)]

    @property
    def linears(self) -> list[Linear]:
        """Every linear layer, in order (their kernels are chosen by linear_kernels.choose_kernels)."""
        return [*(linear for b in self.blocks for linear in (b.qkv, b.out, b.fc, b.proj)), self.lm_head]

    def __call__(self, ids, positions, padding, store, past_len: int, all_logits: bool, shared=None) -> torch.Tensor:
        """Logits [B, T or 1, V] of `ids` [B, T] after `past_len` stored columns of each store row.

        `padding` ([B, past_len + T] with 0 on left padding, or None) is given for one-token steps
        and for prefills of several left-padded prompts.
        `shared` (a one-row KV, or None) is a prefix every row sees before its stored columns.
        Activations stay flat ([B * T, width]) between the blocks: the linear layers take them as
        they are (a decode step runs ~100 small operations, so each one saved counts).
        """
        batch, length = ids.shape
        x = (F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)).view(batch * length, self.width)
        if shared is None:
            mask = attention_mask(padding, length, past_len, x.dtype, x.device)
        else:
            mask = additive_mask(padding, length, past_len, x.dtype, x.device)
        for layer, block in enumerate(self.blocks):
            x = self._block(x, block, layer, store, (batch, length, past_len, shared), mask)
        if not all_logits:
            x, length = x.view(batch, length, self.width)[:, -1], 1
        return self.lm_head(torch.layer_norm(x, *self.ln_f)).view(batch, length, -1)

    def _block(self, x, block: BlockWeights, layer: int, store, shape: tuple, mask) -> torch.Tensor:
        x = x + self._attention(torch.layer_norm(x, *block.ln_1), block, layer, store, shape, mask)
        return x + block.proj(block.act(block.fc(torch.layer_norm(x, *block.ln_2))))

    def _attention(self, x, block: BlockWeights, layer: int, store, shape: tuple, mask) -> torch.Tensor:
        batch, length, past_len, shared = shape
        qkv = block.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        keys, values = store.write(layer, past_len, key, value)
        if shared is None:
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, is_causal=mask is None and length > 1, scale=block.scale,
            )
        else:
            out = shared_prefix_attention(query, *shared[layer], keys, values, mask, block.scale)
        return block.out(out.transpose(1, 2).reshape(batch * length, self.width))


def attention_mask(padding, length: int, past_len: int, dtype, device) -> torch.Tensor | None:
    """The attention mask of `length` new tokens after `past_len` columns (None: plain causal).

    Additive (0 / -inf) for a padded step (one token, or a prefill of left-padded prompts);
    boolean (True: may attend) for a prefill after a cached past.
    """
    if padding is not None and length > 1:  # a padded prefill: causal as well; a padding query sees itself
        columns = torch.arange(past_len + length, device=device)
        own_column = torch.arange(length, device=device)[:, None] + past_len
        allowed = (columns <= own_column) & (padding[:, None, :] != 0) | (columns == own_column)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]
    if padding is not None:  # additive, made once per step (SDPA would convert a boolean mask in every layer)
        hidden = torch.zeros(padding.shape, dtype=dtype, device=device).masked_fill_(padding == 0, float("-inf"))
        return hidden[:, None, None, :]
    if length == 1 or past_len == 0:
        return None  # one token sees everything; no past: is_causal does it
    return torch.ones(length, past_len + length, dtype=torch.bool, device=device).tril(past_len)


def additive_mask(padding, length: int, past_len: int, dtype, device) -> torch.Tensor | None:
    """`attention_mask` as an additive mask in every case (None: no padding, plain causal)."""
    mask = attention_mask(padding, length, past_len, dtype, device)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
