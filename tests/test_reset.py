"""Every reset strategy returns every architecture to its original weights, bit for bit."""

import hashlib
import random

import pytest
import torch
import torch._dynamo.testing
import transformers
from conftest import (
    MOE_ARCHITECTURES,
    assert_identical,
    random_edits,
    saved,
    snapshot,
    tiny_model,
)
from safetensors.torch import load_file, save_file

from abliterate.components import find_components
from abliterate.errors import UserError
from abliterate.reset import (
    AdapterEditor,
    DiskRestorer,
    Edit,
    InPlaceEditor,
    LayerCache,
    RestoreMismatch,
    choose_strategy,
    describe,
    make_editor,
)

GiB = 1024**3


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().double().numpy().tobytes())
    return digest.hexdigest()


def editor_for(strategy: str, architecture: str, tmp_path):
    model = tiny_model(architecture)
    folder = saved(model, tmp_path)
    editable = find_components(model)

    def reload():
        if architecture == "listed_experts":  # a custom layout from_pretrained cannot rebuild
            return tiny_model(architecture)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    return model, editable, make_editor(strategy, model, editable, folder, reload=reload)


@pytest.mark.parametrize("strategy", ["gpu-cache", "host-cache", "disk", "reload"])
def test_restore_is_bit_exact(architecture, strategy, tmp_path):
    model, editable, editor = editor_for(strategy, architecture, tmp_path)
    original = snapshot(model)
    editor.apply(random_edits(editable.num_layers, editable.hidden_size, random.Random(0)), "full")
    assert any(not torch.equal(p, original[n]) for n, p in model.named_parameters())
    editor.reset()
    assert_identical(model, original)


def test_layer_cache_mirrors_the_components(architecture):
    model = tiny_model(architecture)
    editable = find_components(model)
    cache = LayerCache(editable)
    assert set(cache.originals) == set(range(editable.num_layers))
    for layer, components in enumerate(editable.components):
        assert set(cache.originals[layer]) == set(components)
        for component, matrices in components.items():
            copies = cache.originals[layer][component]
            assert len(copies) == len(matrices)
            for matrix, copy in zip(matrices, copies, strict=True):
                assert copy.shape == matrix.parameter.shape and copy.dtype == matrix.parameter.dtype
                assert copy.data_ptr() != matrix.parameter.data_ptr()
    cached = sum(
        t.numel() * t.element_size()
        for parts in cache.originals.values()
        for ts in parts.values()
        for t in ts
    )
    assert cached == editable.editable_bytes == cache.host_bytes  # on a CPU model the "device" is the host
    assert editable.editable_bytes < sum(p.numel() * p.element_size() for p in model.parameters())


def test_cache_size_is_reported_against_the_model_size():
    model = tiny_model("llama")
    editable = find_components(model)
    choice = choose_strategy("auto", True, editable, free_host_bytes=64 * GiB)
    line = describe(choice, editable, model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert line.startswith("reset: gpu-cache, ")
    assert f"{100 * editable.editable_bytes / total:.1f}% of" in line


def test_thousand_random_cycles_leave_the_model_identical():
    model = tiny_model("qwen2_moe")
    editable = find_components(model)
    editor = InPlaceEditor(editable, LayerCache(editable))
    before = state_hash(model)
    rng = random.Random(7)
    for _ in range(1000):
        edits = random_edits(editable.num_layers, editable.hidden_size, rng)
        editor.apply(edits, rng.choice(["none", "pre", "full"]))
        editor.reset()
    assert state_hash(model) == before


def test_only_touched_layers_are_restored_and_sequences_stay_exact(tmp_path):
    model, editable, editor = editor_for("gpu-cache", "qwen3_moe", tmp_path)
    original = snapshot(model)
    restored = []
    real_restore = editor.restorer.restore
    editor.restorer.restore = lambda touched: (restored.append(list(touched)), real_restore(touched))
    rng = random.Random(3)
    for layers in ([0], [1, 2], [2], [0, 1, 2], [1]):
        edits = [Edit(layer, "mlp", torch.randn(editable.hidden_size), 1.0) for layer in layers]
        edits += [Edit(layers[0], "attn", torch.randn(editable.hidden_size), rng.uniform(0.5, 1.5))]
        editor.apply(edits)
        editor.reset()
        assert sorted({layer for layer, _ in restored[-1]}) == layers
        assert_identical(model, original)


def test_cache_weights_false_keeps_no_cache(tmp_path):
    model = tiny_model("llama")
    folder = saved(model, tmp_path)
    editable = find_components(model)
    choice = choose_strategy("auto", False, editable, free_host_bytes=64 * GiB)
    assert choice.strategy == "disk"
    editor = make_editor(choice.strategy, model, editable, folder)
    assert isinstance(editor.restorer, DiskRestorer)
    assert editor.restorer.device_bytes == editor.restorer.host_bytes == 0
    assert not hasattr(editor.restorer, "originals")


def test_auto_choice_follows_free_memory():
    editable = find_components(tiny_model("llama"))
    assert choose_strategy("auto", True, editable, free_host_bytes=64 * GiB).strategy == "gpu-cache"
    assert choose_strategy("auto", True, editable, free_host_bytes=1 * GiB).strategy == "disk"
    with pytest.raises(UserError, match="cache-weights"):
        choose_strategy("host-cache", False, editable)


@pytest.mark.parametrize("architecture", ["mixtral", "gpt_oss"])
def test_disk_restore_reads_both_expert_layouts(architecture, tmp_path):
    """Mixtral checkpoints hold one tensor per expert (`experts.N.w2.weight`), others the fused 3-D tensor."""
    model = tiny_model(architecture)
    folder = saved(model, tmp_path)
    per_expert = load_file(next(folder.glob("*.safetensors")))
    editable = find_components(model)
    original = snapshot(model)
    fused_keys = [matrix.name for *_, matrix in editable.matrices() if matrix.parameter.dim() == 3]
    assert fused_keys
    if architecture == "mixtral":
        assert not any(key in per_expert for key in fused_keys)
    for layout in ("per-expert", "fused"):
        if layout == "fused":
            for file in folder.glob("*.safetensors"):
                file.unlink()
            save_file(
                {name: tensor.contiguous() for name, tensor in original.items()}, folder / "model.safetensors"
            )
        editor = make_editor("disk", model, editable, folder)
        editor.apply(random_edits(editable.num_layers, editable.hidden_size, random.Random(1)))
        editor.reset()
        assert_identical(model, original)


def test_disk_restore_without_files_is_a_clear_error(tmp_path):
    editable = find_components(tiny_model("llama"))
    with pytest.raises(UserError, match="safetensors"):
        DiskRestorer(editable, tmp_path)


def test_an_adapter_run_without_the_models_files_is_refused_before_the_study():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="--reset adapter saves by editing the model's files"):
        make_editor("adapter", model, find_components(model), folder=None)


@pytest.mark.parametrize("strategy", ["gpu-cache", "adapter"])
def test_no_editor_is_made_over_matrices_offloaded_to_the_meta_device(strategy, tmp_path):
    model = tiny_model("llama")
    # accelerate leaves an offloaded layer's weights on the meta device.
    model.model.layers[1].mlp.down_proj.to_empty(device="meta")
    with pytest.raises(
        UserError, match=r"matrices are offloaded \(model.layers.1.mlp.down_proj.weight, 1 in all\)"
    ):
        make_editor(strategy, model, find_components(model), folder=tmp_path)


def test_verify_restore_catches_a_corrupted_cache():
    model = tiny_model("llama")
    editable = find_components(model)
    cache = LayerCache(editable)
    editor = InPlaceEditor(editable, cache, verify=True)
    edit = [Edit(1, "attn", torch.randn(editable.hidden_size), 1.0)]
    editor.apply(edit)
    editor.reset()  # a healthy cache passes
    cache.originals[1]["attn"][0][0, 0] += 1.0
    editor.apply(edit)
    with pytest.raises(RestoreMismatch, match="corrupt"):
        editor.reset()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "qwen3_moe", "listed_experts"])
@pytest.mark.parametrize("row_norm", ["none", "pre"])
def test_adapter_output_equals_the_in_place_edit(architecture, row_norm):
    if row_norm == "pre" and architecture == "qwen3_moe":
        pytest.skip("row-norm pre is not offered for fused experts with the adapter")
    tokens = torch.tensor([[3, 9, 27, 81, 20, 4]])
    rng = random.Random(5)
    adapted = tiny_model(architecture)
    editable = find_components(adapted)
    edits = random_edits(editable.num_layers, editable.hidden_size, rng)
    original_weights = snapshot(adapted)
    adapter = AdapterEditor(adapted, editable)
    adapter.apply(edits, row_norm)
    with torch.no_grad():
        adapter_logits = adapted(tokens).logits
    assert_identical(adapted, original_weights)  # the adapter never writes weights

    edited = tiny_model(architecture)
    InPlaceEditor(find_components(edited), LayerCache(find_components(edited))).apply(edits, row_norm)
    with torch.no_grad():
        edited_logits = edited(tokens).logits
    assert torch.allclose(adapter_logits, edited_logits, atol=1e-4, rtol=1e-4)

    adapter.reset()
    with torch.no_grad():
        assert torch.equal(adapted(tokens).logits, tiny_model(architecture)(tokens).logits)


@pytest.mark.parametrize("architecture", ["llama", "qwen3_moe"])
def test_a_compiled_forward_reads_each_adapter_edit_without_compiling_again(architecture):
    """The compiled decoder's graph holds the adapter's side paths, at weight 0 where nothing is
    edited; later trials' edits reach it through tensors rewritten in place."""
    torch._dynamo.reset()
    tokens = torch.tensor([[3, 9, 27, 81, 20, 4]])
    model = tiny_model(architecture)
    editable = find_components(model)
    adapter = AdapterEditor(model, editable)
    counter = torch._dynamo.testing.CompileCounter()  # compiles into FX graphs run eagerly, and counts
    compiled = torch.compile(lambda ids: model(ids).logits, backend=counter, fullgraph=True)
    with torch.no_grad():
        original = model(tokens).logits
        assert torch.equal(compiled(tokens), original)
        for seed in range(2):
            edits = random_edits(editable.num_layers, editable.hidden_size, random.Random(seed))
            adapter.apply(edits, "none")
            eager = model(tokens).logits
            assert not torch.equal(eager, original)
            assert torch.equal(compiled(tokens), eager)
            adapter.reset()
            assert torch.equal(compiled(tokens), original)
    assert counter.frame_count == 1


def test_adapter_with_row_norm_pre_keeps_a_zero_row_zero():
    tokens = torch.tensor([[3, 9, 27, 81, 20, 4]])
    models = [tiny_model("llama"), tiny_model("llama")]
    for model in models:
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight[5].zero_()  # a pruned feature
    edits = [Edit(0, "attn", torch.ones(32), 1.0)]
    AdapterEditor(models[0], find_components(models[0])).apply(edits, "pre")
    InPlaceEditor(find_components(models[1]), LayerCache(find_components(models[1]))).apply(edits, "pre")
    with torch.no_grad():
        adapter_logits, edited_logits = (model(tokens).logits for model in models)
    assert torch.isfinite(adapter_logits).all()
    assert torch.allclose(adapter_logits, edited_logits, atol=1e-4, rtol=1e-4)


def test_adapter_refuses_full_row_norm():
    model = tiny_model("llama")
    editable = find_components(model)
    with pytest.raises(UserError, match="row-norm full"):
        AdapterEditor(model, editable).apply([Edit(0, "attn", torch.ones(32), 1.0)], "full")


def test_moe_architectures_are_covered():
    assert {"qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "listed_experts"} <= set(MOE_ARCHITECTURES)


def test_disk_restore_reads_a_sharded_checkpoint(tmp_path):
    model = tiny_model("qwen2_moe")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    editable = find_components(model)
    original = snapshot(model)
    editor = make_editor("disk", model, editable, folder)
    editor.apply(random_edits(editable.num_layers, editable.hidden_size, random.Random(4)))
    editor.reset()
    assert_identical(model, original)
