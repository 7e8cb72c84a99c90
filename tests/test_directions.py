"""Refusal directions from residuals."""

import pytest
import torch

from abliterate.directions import capture_residuals, directions_at, refusal_directions
from abliterate.errors import UserError


def test_directions_are_normalized_mean_differences():
    harmful = torch.randn(10, 3, 8) + torch.tensor([1.0] + [0.0] * 7)
    harmless = torch.randn(12, 3, 8)
    basis = refusal_directions(harmful, harmless)
    expected = harmful.double().mean(0) - harmless.double().mean(0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert basis.shape == (2, 3, 8) and basis.dtype == torch.float32
    assert torch.allclose(basis[0].double(), expected, atol=1e-6)
    assert torch.equal(basis[1], torch.zeros(3, 8))  # a fixed method: nothing to project against
    assert torch.equal(directions_at(basis, 1.0), basis[0])


def test_projected_directions_are_the_unit_part_orthogonal_to_the_harmless_mean():
    harmful = torch.randn(10, 3, 8) + torch.tensor([1.0, 2.0] + [0.0] * 6)
    harmless = torch.randn(12, 3, 8) + torch.tensor([0.0, 3.0] + [0.0] * 6)
    directions = refusal_directions(harmful, harmless, "projected")[0]
    harmless_mean = harmless.double().mean(0)
    difference = harmful.double().mean(0) - harmless_mean
    along = harmless_mean / harmless_mean.norm(dim=-1, keepdim=True)
    expected = difference - (difference * along).sum(-1, keepdim=True) * along
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(directions.double(), expected, atol=1e-6)
    assert torch.allclose(
        (directions.double() * along).sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(directions.norm(dim=-1), torch.ones(3))
    # Not the plain mean difference: the harmless mean shares its second coordinate.
    assert not torch.allclose(directions, refusal_directions(harmful, harmless)[0], atol=1e-3)


def test_a_searched_basis_spans_mean_difference_to_projected():
    harmful = torch.randn(10, 3, 8) + torch.tensor([1.0, 2.0] + [0.0] * 6)
    harmless = torch.randn(12, 3, 8) + torch.tensor([0.0, 3.0] + [0.0] * 6)
    basis = refusal_directions(harmful, harmless, "search")
    harmless_mean = harmless.mean(0)
    assert torch.allclose(basis[1], harmless_mean / harmless_mean.norm(dim=-1, keepdim=True))
    mean_difference = refusal_directions(harmful, harmless, "mean-difference")[0]
    projected = refusal_directions(harmful, harmless, "projected")[0]
    assert torch.equal(directions_at(basis, 0.0), mean_difference)
    assert torch.allclose(directions_at(basis, 1.0), projected, atol=1e-6)
    halfway = directions_at(basis, 0.5)
    assert torch.allclose(halfway.norm(dim=-1), torch.ones(3))
    # Half of the part c along the harmless mean is left: c/2 over the norm sqrt(1 - c^2 + c^2/4).
    c = (mean_difference * basis[1]).sum(-1)
    assert torch.allclose((halfway * basis[1]).sum(-1), c / 2 / (1 - 0.75 * c**2).sqrt(), atol=1e-6)


def test_directions_stored_before_bases_are_used_as_they_are():
    stored = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert directions_at(stored, 0.7) is stored


def test_a_difference_already_orthogonal_to_the_harmless_mean_is_kept():
    harmless = torch.zeros(4, 1, 3)
    harmless[:, 0, 0] = 2.0  # the harmless mean lies along the first axis
    harmful = harmless.clone()
    harmful[:, 0, 2] = 5.0  # and the difference along the third
    for method in ("mean-difference", "projected"):
        assert torch.allclose(
            refusal_directions(harmful, harmless, method)[0], torch.tensor([[0.0, 0.0, 1.0]])
        )


def test_an_unknown_direction_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        refusal_directions(torch.randn(4, 2, 8), torch.randn(4, 2, 8), "median")


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


class SmallMemoryModel:
    """Stands in for a ChatModel on an accelerator that fits two prompts at a time."""

    def last_token_residuals(self, batch, layers):
        if len(batch["input_ids"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch["input_ids"][:, :1].float().expand(-1, len(layers)).unsqueeze(-1).repeat(1, 1, 4)


def test_residual_capture_halves_a_batch_that_does_not_fit():
    batch = {"input_ids": torch.arange(8).reshape(8, 1), "attention_mask": torch.ones(8, 1)}
    residuals = capture_residuals(SmallMemoryModel(), [batch], layers=[None, None, None])
    assert residuals.shape == (8, 3, 4)
    assert torch.equal(residuals[:, 0, 0], torch.arange(8).float())  # every prompt, in order
