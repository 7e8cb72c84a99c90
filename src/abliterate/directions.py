"""Residual capture and refusal directions.

The refusal direction of layer l is the normalized difference between the mean residual (after
layer l, at the last prompt token, in float32) over harmful prompts and over harmless ones, or
that difference made orthogonal to the harmless mean (`projected`), or anything between the two,
chosen per trial (`search`), or one of the two, chosen per trial (`choose`).

A study keeps its directions as a basis, (2, layers, hidden): unit directions, and the unit
harmless means that a trial's `direction_projection` (0 to 1) projects them against. A fixed method
stores its directions with a zero second half, so that no projection changes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from abliterate.errors import UserError
from abliterate.model import Batch, ChatModel, in_halves_on_oom

DIRECTION_METHODS = ("mean-difference", "projected", "search", "choose")


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
    """The direction basis, (2, layers, hidden), from (prompts, layers, hidden) residuals.

    `mean-difference`: the harmful mean minus the harmless mean. `projected`: that difference with
    its component along the harmless mean removed (projected abliteration): the harmless mean is
    what every prompt's residual shares, so an edit along it damages ordinary answers too. `search`:
    the mean difference with the harmless mean beside it, for each trial to project by its own
    amount: models differ in which works better (`benchmarks/quality.py`); `choose` stores the
    same, for each trial to project fully or not at all.
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
    if (difference.norm(dim=-1) == 0).any():
        raise UserError("harmful and harmless prompts give identical mean residuals; check the prompt sets")
    along = F.normalize(harmless_mean, dim=-1)
    if method in ("search", "choose"):
        return torch.stack([F.normalize(difference, dim=-1), along])
    if method == "projected":
        difference = difference - (difference * along).sum(dim=-1, keepdim=True) * along
        if (difference.norm(dim=-1) == 0).any():
            raise UserError(
                "a layer's refusal direction lies along the harmless mean; try --direction mean-difference"
            )
    return torch.stack([F.normalize(difference, dim=-1), torch.zeros_like(difference)])


def directions_at(basis: torch.Tensor, projection: float = 0.0) -> torch.Tensor:
    """Unit directions (layers, hidden) of a basis, with `projection` (0 to 1) of their part along
    its harmless means removed. A study stored before bases existed holds (layers, hidden)
    directions: they are used as they are."""
    if basis.dim() == 2:
        return basis
    directions, means = basis.float()
    if projection == 0 or not means.any():  # nothing to project: as stored, to the bit
        return directions
    along = (directions * means).sum(dim=-1, keepdim=True) * means
    return F.normalize(directions - projection * along, dim=-1)
