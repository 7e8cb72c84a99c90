"""The weight edit: pure tensor math, no I/O, no Optuna.

For a matrix W (hidden x in) that writes into the residual stream and a unit direction r:

    W' = W - w * r (r^T W)

removes a fraction w of what W can write along r (w = 1 removes all of it). Matrices arrive as
(..., hidden, in) views (see `components.Matrix.view`), so a stack of experts is edited in one go.
The arithmetic happens in float32 and the result is stored back in the matrix's own dtype.

Row-norm modes, where row i of W is what input features write into residual feature i:

- none: the plain edit above;
- pre:  edit the row-normalized matrix and scale each row back by its original norm, so that rows
        with large norms do not dominate the projection;
- full: like pre, then renormalize each edited row to its original norm (norm-preserving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROW_NORMS = ("none", "pre", "full")


@dataclass(frozen=True)
class Kernel:
    """How the ablation weight of one component varies over layers.

    The weight is `max_weight` at `max_weight_position` (a fractional layer index) and falls
    linearly to `min_weight` at `min_weight_distance` layers away; beyond that it is zero and the
    layer is left alone.
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight_at(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        fraction = distance / self.min_weight_distance if self.min_weight_distance > 0 else 0.0
        return self.max_weight + fraction * (self.min_weight - self.max_weight)

    def weights(self, num_layers: int) -> list[float]:
        return [self.weight_at(layer) for layer in range(num_layers)]


def ablate(
    matrix: torch.Tensor, direction: torch.Tensor, weight: float, row_norm: str = "none"
) -> torch.Tensor:
    """Return the edited matrix in float32; `matrix` is (..., hidden, in), `direction` (hidden,)."""
    if row_norm not in ROW_NORMS:
        raise ValueError(f"row_norm must be one of {ROW_NORMS}, got {row_norm!r}")
    w = matrix.to(torch.float32)
    r = direction.to(device=w.device, dtype=torch.float32)
    r = r / r.norm()
    if row_norm == "none":
        return w - weight * r[:, None] * torch.einsum("h,...hi->...i", r, w)[..., None, :]
    norms = w.norm(dim=-1, keepdim=True)
    unit = w / norms.clamp_min(torch.finfo(torch.float32).tiny)
    edited = unit - weight * r[:, None] * torch.einsum("h,...hi->...i", r, unit)[..., None, :]
    if row_norm == "full":
        edited = edited / edited.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return edited * norms


@torch.no_grad()
def ablate_(view: torch.Tensor, direction: torch.Tensor, weight: float, row_norm: str = "none") -> None:
    """Edit a (..., hidden, in) view in place, one leading slice at a time to bound the float32 copy."""
    if view.dim() == 2:
        view.copy_(ablate(view, direction, weight, row_norm))
        return
    for index in range(view.shape[0]):
        ablate_(view[index], direction, weight, row_norm)


def interpolate_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer index, linear between neighbouring layers."""
    num_layers = directions.shape[0]
    if not 0 <= index <= num_layers - 1:
        raise ValueError(f"direction index {index} is outside 0..{num_layers - 1}")
    low = math.floor(index)
    high = min(low + 1, num_layers - 1)
    fraction = index - low
    mixed = (1 - fraction) * directions[low].float() + fraction * directions[high].float()
    return mixed / mixed.norm()
