"""The model runner: the only code that builds tensors for the model and calls it.

Two kinds of forward pass:
- `prefill`: one sequence, any number of new tokens after its cached prefix;
- `decode`: many sequences, one new token each, with pasts of different lengths. Pasts are
  left-padded to one length; an attention mask hides the padding and explicit position ids
  give every sequence its own positions, so results equal unbatched runs.
"""

from __future__ import annotations

import torch

from .sequence import KVCache


class ModelRunner:
    """Runs a loaded Hugging Face causal LM on token ids with per-sequence KV caches."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def prefill(self, new_ids: list[int], past: KVCache | None, past_len: int, all_logits: bool):
        """Run `new_ids` after a cached past; return logits ([n, V] or [1, V]) and the new KV."""
        ids = torch.tensor([new_ids], device=self.device)
        positions = torch.arange(past_len, past_len + len(new_ids), device=self.device)[None]
        out = self.model(
            input_ids=ids, position_ids=positions, past_key_values=make_cache(past), use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.logits[0].float().cpu(), unpack_cache(out.past_key_values)

    @torch.inference_mode()
    def decode(self, tokens: list[int], pasts: list[KVCache | None], past_lens: list[int]):
        """One new token for each of several sequences; return logits [B, V] and each new KV."""
        if len(tokens) == 1:
            logits, kv = self.prefill(tokens, pasts[0], past_lens[0], all_logits=False)
            return logits, [kv]
        width = max(past_lens)
        mask = torch.zeros(len(tokens), width + 1, dtype=torch.long, device=self.device)
        for row, length in enumerate(past_lens):
            mask[row, width - length:] = 1
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            position_ids=torch.tensor(past_lens, device=self.device)[:, None],
            attention_mask=mask,
            past_key_values=make_cache(pack_pasts(pasts, past_lens, width)) if width else None,
            use_cache=True, logits_to_keep=1,
        )
        batch_kv = unpack_cache(out.past_key_values)
        return out.logits[:, -1].float().cpu(), split_kv(batch_kv, past_lens, width)


def make_cache(past: KVCache | None):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=past) if past else DynamicCache()


def unpack_cache(cache) -> KVCache:
    return [(layer.keys, layer.values) for layer in cache.layers]


def pack_pasts(pasts: list[KVCache | None], lengths: list[int], width: int) -> KVCache:
    """Left-pad every past to `width` positions and stack them into one batch, per layer."""
    template = next(p for p in pasts if p)
    packed = []
    for layer, (k0, v0) in enumerate(template):
        keys = [left_pad(p[layer][0] if p else None, k0, n, width) for p, n in zip(pasts, lengths)]
        values = [left_pad(p[layer][1] if p else None, v0, n, width) for p, n in zip(pasts, lengths)]
        packed.append((torch.cat(keys), torch.cat(values)))
    return packed


def left_pad(t: torch.Tensor | None, like: torch.Tensor, length: int, width: int) -> torch.Tensor:
    pad = like.new_zeros(1, like.shape[1], width - length, like.shape[3])
    return pad if t is None else torch.cat([pad, t[:, :, :length]], dim=2)


def split_kv(batch_kv: KVCache, past_lens: list[int], width: int) -> list[KVCache]:
    """Each row's own KV (its past without padding, plus the new token), as views."""
    return [
        [(k[row:row + 1, :, width - n:], v[row:row + 1, :, width - n:]) for k, v in batch_kv]
        for row, n in enumerate(past_lens)
    ]
