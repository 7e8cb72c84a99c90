"""Decode-step attention for grouped-query models (attention.py): the same attention as
transformers' SDPA, without copying the KV cache, and the same greedy responses."""

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from abliterate import attention
from abliterate.attention import grouped_sdpa_attention, use_grouped_decode_attention


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _decode_step(mask_kind: str):
    torch.manual_seed(0)
    batch, kv_heads, groups, keys, dim = 2, 2, 3, 7, 8
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    key, value = torch.randn(2, batch, kv_heads, keys, dim)
    keep = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    keep[0, ..., :3] = False  # left padding
    masks = {"none": None, "bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))}
    return query, key, value, masks[mask_kind]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_a_decode_step_attends_like_sdpa_without_copying_the_cache(mask_kind, monkeypatch):
    query, key, value, mask = _decode_step(mask_kind)
    expected, _ = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.3)

    def copies(*args, **kwargs):
        raise AssertionError("a decode step of a grouped model went to transformers' SDPA (repeat_kv)")

    monkeypatch.setattr(attention, "sdpa_attention_forward", copies)
    output, _ = grouped_sdpa_attention(_Module(), query, key, value, mask, scaling=0.3)
    assert output.shape == expected.shape == (2, 1, 6, 8)
    torch.testing.assert_close(output, expected)


def test_prefill_and_ungrouped_attention_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(
        attention, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(1) or (None, None)
    )
    query, key, value, mask = _decode_step("bool")
    grouped_sdpa_attention(
        _Module(), torch.cat([query, query], dim=2), key, value, None
    )  # two queries: prefill
    grouped_sdpa_attention(_Module(), query[:, :2], key, value, mask)  # as many query heads as kv heads
    grouped_sdpa_attention(_Module(), query, key, value, mask, softcap=50.0)
    assert len(calls) == 3


@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES if a != "gpt2"])
def test_greedy_responses_are_the_same_with_grouped_decode_attention(architecture):
    model = tiny_model(architecture)
    ids = torch.randint(3, 100, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    config = transformers.GenerationConfig(
        max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    before = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    sdpa = model.config._attn_implementation == "sdpa"  # gemma2 and gpt_oss attend eagerly: kept
    assert use_grouped_decode_attention(model) == sdpa
    assert (model.config._attn_implementation == attention.NAME) == sdpa
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, generation_config=config), before)


def test_a_model_without_groups_keeps_its_attention():
    model = tiny_model("gpt2")
    assert not use_grouped_decode_attention(model)
    assert model.config._attn_implementation != attention.NAME
