"""Refusal directions from residuals."""

import pytest
import torch

from abliterate.directions import capture_residuals, refusal_directions
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
