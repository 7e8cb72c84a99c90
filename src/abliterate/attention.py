"""Decode-step attention without copying the KV cache for grouped-query models.

In grouped-query attention several query heads share one key-value head. transformers' SDPA
attention, given a mask (and batched generation always has one: left padding, and the unwritten
end of a static cache), copies every key-value head once per query head that reads it before
calling the kernel, in every layer at every decode step: on a Qwen2.5-7B shape (28 query heads, 4
key-value heads) that copy and the attention over the copies took 4.6 ms of an 11.8 ms decode step
on an H200, where reading the cache once takes under 0.1 ms
(benchmarks/results/trials-decode-h200-2026-12-02.md).

A decode step has one query token, so a key-value head's group of query heads can stand in for
query positions instead: the query (batch, heads, 1, dim) is viewed as (batch, kv heads, group,
dim) and attends to the cache as it is. The arithmetic is the same attention; everything else
(prefill, models without groups, masks of other shapes) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "abliterate_grouped_sdpa"


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, queries, dim), key and value
    (batch, kv heads, keys, dim); returns (batch, queries, heads, dim)."""
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    plain = (
        queries == 1
        and groups > 1
        and dropout == 0.0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1)))
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.view(
        batch, key.shape[1], groups, dim
    )  # head h = kv head h // groups, as transformers pairs them
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return output.view(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model: transformers.PreTrainedModel) -> bool:
    """Switch a grouped-query model that attends through SDPA to `grouped_sdpa_attention`; say
    whether it was switched (other models, and other attention implementations, stay as they are)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if model.config._attn_implementation != "sdpa" or not heads or kv_heads == heads:
        return False
    transformers.AttentionInterface.register(NAME, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks SDPA takes
    model.set_attn_implementation(NAME)
    return True
