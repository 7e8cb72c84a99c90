"""The edit math against a float64 reference."""

import pytest
import torch

from abliterate.ablation import Kernel, ablate, ablate_, interpolate_direction


def reference(matrix: torch.Tensor, direction: torch.Tensor, weight: float, row_norm: str) -> torch.Tensor:
    """Straight from the definitions, in float64, one 2-D matrix at a time."""
    w = matrix.double()
    r = direction.double() / direction.double().norm()
    projector = torch.outer(r, r)
    if row_norm == "none":
        return w - weight * projector @ w
    norms = w.norm(dim=1, keepdim=True)
    unit = w / norms
    edited = unit - weight * projector @ unit
    if row_norm == "full":
        edited = edited / edited.norm(dim=1, keepdim=True)
    return edited * norms


@pytest.mark.parametrize("row_norm", ["none", "pre", "full"])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 1.4])
def test_ablate_matches_float64_reference(row_norm, weight):
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(16, 24, generator=generator)
    direction = torch.randn(16, generator=generator)
    result = ablate(matrix, direction, weight, row_norm)
    expected = reference(matrix, direction, weight, row_norm)
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_full_weight_removes_the_direction_from_every_output():
    matrix = torch.randn(16, 24)
    direction = torch.randn(16)
    edited = ablate(matrix, direction, 1.0)
    unit = direction / direction.norm()
    assert (unit @ edited).abs().max() < 1e-5
    # Anything orthogonal to the direction is untouched.
    other = torch.randn(16)
    other -= (other @ unit) * unit
    assert torch.allclose(other @ edited, other @ matrix, atol=1e-5)


def test_full_row_norm_keeps_row_norms():
    matrix = torch.randn(16, 24)
    edited = ablate(matrix, torch.randn(16), 1.0, "full")
    assert torch.allclose(edited.norm(dim=1), matrix.norm(dim=1), atol=1e-5)


def test_stacked_experts_equal_per_expert_edits():
    stack = torch.randn(3, 16, 24)
    direction = torch.randn(16)
    for row_norm in ("none", "pre", "full"):
        stacked = ablate(stack, direction, 0.7, row_norm)
        for expert in range(3):
            assert torch.allclose(stacked[expert], ablate(stack[expert], direction, 0.7, row_norm), atol=1e-6)


def test_in_place_edit_keeps_dtype_and_storage_of_a_transposed_view():
    parameter = torch.randn(2, 24, 16, dtype=torch.bfloat16)  # (experts, in, out): residual axis last
    view = parameter.movedim(2, 1)
    pointer = parameter.data_ptr()
    expected = ablate(view, torch.ones(16), 1.0).to(torch.bfloat16)
    ablate_(view, torch.ones(16), 1.0)
    assert parameter.data_ptr() == pointer and parameter.dtype == torch.bfloat16
    assert torch.equal(parameter.movedim(2, 1), expected)


def test_unknown_row_norm_is_rejected():
    with pytest.raises(ValueError):
        ablate(torch.randn(4, 4), torch.randn(4), 1.0, "sideways")


def test_kernel_weights_fall_linearly_and_stop_beyond_the_distance():
    kernel = Kernel(max_weight=1.2, max_weight_position=4.0, min_weight=0.2, min_weight_distance=2.0)
    assert kernel.weights(8) == pytest.approx([0.0, 0.0, 0.2, 0.7, 1.2, 0.7, 0.2, 0.0])


def test_kernel_at_fractional_position():
    kernel = Kernel(max_weight=1.0, max_weight_position=2.5, min_weight=0.0, min_weight_distance=1.0)
    assert kernel.weights(5) == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.0])


def test_interpolated_direction():
    directions = torch.eye(4)
    assert torch.equal(interpolate_direction(directions, 2.0), directions[2])
    halfway = interpolate_direction(directions, 1.5)
    assert torch.allclose(halfway, torch.tensor([0.0, 1.0, 1.0, 0.0]) / 2**0.5)
    assert torch.isclose(halfway.norm(), torch.tensor(1.0))
    with pytest.raises(ValueError):
        interpolate_direction(directions, 3.5)
