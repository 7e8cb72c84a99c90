"""Refusal directions from residuals."""

import pytest
import torch

from abliterate.directions import refusal_directions
from abliterate.errors import UserError


def test_directions_are_normalized_mean_differences():
    harmful = torch.randn(10, 3, 8) + torch.tensor([1.0] + [0.0] * 7)
    harmless = torch.randn(12, 3, 8)
    directions = refusal_directions(harmful, harmless)
    expected = harmful.double().mean(0) - harmless.double().mean(0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert directions.shape == (3, 8) and directions.dtype == torch.float32
    assert torch.allclose(directions.double(), expected, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_residuals_stop_with_a_clear_message(bad):
    harmful = torch.randn(4, 2, 8)
    harmful[1, 0, 3] = bad
    with pytest.raises(UserError, match="harmful prompts contain NaN or inf"):
        refusal_directions(harmful, torch.randn(4, 2, 8))


def test_identical_means_are_refused():
    same = torch.randn(4, 2, 8)
    with pytest.raises(UserError, match="identical mean residuals"):
        refusal_directions(same, same.clone())
