"""Every supported architecture: the editable matrices are found, with the right layout."""

from types import SimpleNamespace

import pytest
import torch
from conftest import MOE_ARCHITECTURES, tiny_model
from torch import nn

from abliterate.components import find_components
from abliterate.errors import UserError


def test_every_layer_has_both_components(architecture):
    model = tiny_model(architecture)
    editable = find_components(model)
    assert editable.num_layers == 3
    for components in editable.components:
        assert set(components) == {"attn", "mlp"}


def test_matrices_write_the_residual_stream(architecture):
    """view() puts the residual axis second to last and shares storage with the parameter."""
    model = tiny_model(architecture)
    editable = find_components(model)
    parameters = {id(p) for p in model.parameters()}
    for *_, matrix in editable.matrices():
        assert id(matrix.parameter) in parameters
        view = matrix.view()
        assert view.shape[-2] == editable.hidden_size
        assert view.data_ptr() == matrix.parameter.data_ptr()
        assert matrix.name in dict(model.named_parameters())


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_moe_layers_edit_every_expert(architecture):
    model = tiny_model(architecture)
    mlp = find_components(model).components[0]["mlp"]
    experts = sum(matrix.parameter.shape[0] if matrix.parameter.dim() == 3 else 1 for matrix in mlp)
    assert experts >= 3
    if architecture == "qwen2_moe":
        assert any("shared_expert" in matrix.name for matrix in mlp)


def test_transposed_fused_experts_use_the_last_axis():
    model = tiny_model("gpt_oss")
    (fused,) = find_components(model).components[0]["mlp"]
    assert fused.out_axis == 2 and fused.parameter.shape[2] == model.config.hidden_size


def test_conv1d_layout_uses_the_second_axis():
    model = tiny_model("gpt2")
    for *_, matrix in find_components(model).matrices():
        assert matrix.out_axis == 1


def test_editing_a_view_changes_the_model_output(architecture):
    model = tiny_model(architecture)
    tokens = torch.tensor([[5, 6, 7, 8]])
    before = model(tokens).logits
    for *_, matrix in find_components(model).matrices():
        with torch.no_grad():
            matrix.view().mul_(0.5)
    assert not torch.allclose(model(tokens).logits, before)


def test_a_model_without_editable_matrices_is_refused():
    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(hidden_size=4)
            self.layers = nn.ModuleList([nn.Module(), nn.Module()])

    with pytest.raises(UserError, match="no editable matrices"):
        find_components(Empty())


def test_a_model_without_layers_is_refused():
    with pytest.raises(UserError, match="decoder layers"):
        find_components(nn.Linear(3, 3))


def test_ambiguous_fused_layout_is_refused():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(torch.zeros(4, 32, 32))
    del experts.is_transposed
    with pytest.raises(UserError, match="cannot tell which axis"):
        find_components(model)
