"""Residual capture and refusal directions.

The refusal direction of layer l is the normalized difference between the mean residual (after
layer l, at the last prompt token, in float32) over harmful prompts and over harmless ones, or
that difference made orthogonal to the harmless mean (`projected`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from abliterate.errors import UserError
from abliterate.model import Batch, ChatModel, in_halves_on_oom

DIRECTION_METHODS = ("mean-difference", "projected")


def capture_residuals(
    model: ChatModel,
    batches: Sequence[Batch],
    layers: Sequence[nn.Module],
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Residuals at the last prompt token for every prompt and layer: (prompts, layers, hidden)."""
    parts = []
    for batch in batches:
        parts.append(in_halves_on_oom(lambda rows: model.last_token_residuals(rows, layers), batch))
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    return torch.cat(parts)


def refusal_directions(
    harmful: torch.Tensor, harmless: torch.Tensor, method: str = "mean-difference"
) -> torch.Tensor:
    """Unit refusal directions per layer, (layers, hidden), from (prompts, layers, hidden) residuals.

    `mean-difference`: the harmful mean minus the harmless mean. `projected`: that difference with
    its component along the harmless mean removed (projected abliteration): the harmless mean is
    what every prompt's residual shares, so an edit along it damages ordinary answers too.
    """
    if method not in DIRECTION_METHODS:
        raise ValueError(f"method must be one of {DIRECTION_METHODS}, got {method!r}")
    for name, residuals in (("harmful", harmful), ("harmless", harmless)):
        if not torch.isfinite(residuals).all():
            raise UserError(
                f"the residuals of the {name} prompts contain NaN or inf; try another --dtypes (float32)"
            )
    harmless_mean = harmless.float().mean(dim=0)
    difference = harmful.float().mean(dim=0) - harmless_mean
    if method == "projected":
        along = torch.nn.functional.normalize(harmless_mean, dim=-1)
        difference = difference - (difference * along).sum(dim=-1, keepdim=True) * along
    norms = difference.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise UserError("harmful and harmless prompts give identical mean residuals; check the prompt sets")
    return difference / norms
