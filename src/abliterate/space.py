"""The search space: what a trial's parameters are, where they are drawn from, and the edits they mean.

A trial samples, per component (`attn`, `mlp`), a kernel of ablation weights over layers (see
`ablation.Kernel`) and a refusal direction: one interpolated between layers (`global`), or each
layer's own (`per-layer`); with `--direction search`, also how much of the harmless mean to
project out of the directions (`direction_projection` from 0 to 1, see `directions.py`), and with
`--direction choose` whether to project it out (0 or 1). Ranges are fractions of the last layer
index, so one space serves models of any depth.

Two rules keep the multivariate TPE sampler effective. Every parameter is sampled in every trial,
even where a trial ignores it (the direction index under `per-layer`): multivariate TPE models
conditional parameters poorly. And no range depends on another parameter: the minimum weight is a
fraction of the maximum, not a value below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import optuna
import torch

from abliterate.ablation import Kernel, interpolate_direction
from abliterate.components import COMPONENTS
from abliterate.directions import directions_at
from abliterate.reset import Edit


@dataclass(frozen=True)
class Ranges:
    """Bounds of each parameter; positions and distances are fractions of the last layer index."""

    direction_index: tuple[float, float]
    max_weight: tuple[float, float]
    max_weight_position: tuple[float, float]
    min_weight_fraction: tuple[float, float]
    min_weight_distance: tuple[float, float]


RANGES = {
    # Measured on safety-tuned real models (benchmarks/quality.py). Kernels stay in the upper half of
    # the stack: "wide" spent trials on edits reaching far down, at KL 1.5 to 9.9 for little gain
    # (hypervolume 0.43 against 0.80 on SmolLM2). Directions come from any layer above a fifth of the
    # depth: Gemma 3 270M keeps its best ones at 0.40 to 0.55, which a range starting at 0.4 (heretic's)
    # reached only at its edge (0.80 against 0.92).
    "calibrated": Ranges(
        direction_index=(0.2, 1.0),
        max_weight=(0.8, 1.5),
        max_weight_position=(0.6, 1.0),
        min_weight_fraction=(0.0, 1.0),
        min_weight_distance=(0.0, 0.6),
    ),
    # The ranges of earlier releases: any depth, kernels as wide as the model.
    "wide": Ranges(
        direction_index=(0.2, 0.95),
        max_weight=(0.8, 1.5),
        max_weight_position=(0.3, 1.0),
        min_weight_fraction=(0.0, 1.0),
        min_weight_distance=(0.0, 1.0),
    ),
}


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    components: tuple[str, ...] = COMPONENTS
    direction_scope: str = "search"
    ranges: str = "calibrated"
    # fixed: the study's basis says (a fixed direction method); search: a float from 0 to 1;
    # choose: 0 or 1, the mean difference or the projected direction.
    projection: Literal["fixed", "search", "choose"] = "fixed"
    # Where the warm starts take their directions, as fractions of the depth; with a searched or
    # chosen projection, the first one is tried once more unprojected. Good directions lie at 0.2-0.5
    # of the depth on Gemma 3 and at 0.8-1.0 on SmolLM2: four depths land inside both zones, where
    # 0.4/0.6/0.8 met each at its edge (Gemma 0.954 against 0.924, SmolLM2 0.919 against 0.923).
    warm_start_depths: tuple[float, ...] = (0.5, 0.3, 0.7, 0.9)

    def bounds(self, name: str) -> tuple[float, float]:
        """A parameter's bounds in layers (or as they are, for weights)."""
        low, high = getattr(RANGES[self.ranges], name)
        if name in ("max_weight", "min_weight_fraction"):
            return low, high
        last = self.num_layers - 1
        if name == "min_weight_distance":  # at least one layer, so that a kernel has a slope
            return max(1.0, low * last), max(1.0, high * last)
        return low * last, high * last

    def sample(self, trial: optuna.Trial) -> dict:
        """Suggest every parameter of one trial (Optuna records them in the storage)."""
        if self.direction_scope == "search":
            trial.suggest_categorical("direction_scope", ["global", "per-layer"])
        if self.direction_scope in ("search", "global"):
            trial.suggest_float("direction_index", *self.bounds("direction_index"))
        if self.projection == "search":
            trial.suggest_float("direction_projection", 0.0, 1.0)
        elif self.projection == "choose":
            trial.suggest_categorical("direction_projection", [0.0, 1.0])
        for component in self.components:
            for name in ("max_weight", "max_weight_position", "min_weight_fraction", "min_weight_distance"):
                trial.suggest_float(f"{component}.{name}", *self.bounds(name))
        return trial.params

    def warm_starts(self) -> list[dict]:
        """Trials to run first, so that TPE starts from edits known to work on real models.

        The classic abliteration of Arditi et al.: one global direction projected out of every
        layer at a flat weight of 1 (the kernel peaks as near the middle of the stack as its range
        allows and reaches as far as it may), the direction taken from each of `warm_start_depths`
        (kept inside the direction index's range). A searched or chosen projection starts fully
        projected, and the first depth is tried once more unprojected.
        """
        if self.direction_scope == "per-layer":
            return []
        low, high = self.bounds("direction_index")
        lowest, highest = self.bounds("max_weight_position")
        middle = min(max((self.num_layers - 1) / 2, lowest), highest)
        indices = [min(max(depth * (self.num_layers - 1), low), high) for depth in self.warm_start_depths]
        if self.projection != "fixed":
            index_and_projection = [(index, 1.0) for index in indices] + [(indices[0], 0.0)]
        else:
            index_and_projection = [(index, None) for index in indices]
        starts = []
        for index, projection in index_and_projection:
            params: dict = {"direction_index": index}
            if self.direction_scope == "search":
                params["direction_scope"] = "global"
            if projection is not None:
                params["direction_projection"] = projection
            for component in self.components:
                params[f"{component}.max_weight"] = 1.0
                params[f"{component}.max_weight_position"] = middle
                params[f"{component}.min_weight_fraction"] = 1.0
                params[f"{component}.min_weight_distance"] = self.bounds("min_weight_distance")[1]
            starts.append(params)
        return starts


def direction_scope_of(params: dict) -> str:
    """A trial's direction scope: a parameter when searched; else a fixed global scope leaves a
    direction index, and per-layer none."""
    return params.get("direction_scope") or ("global" if "direction_index" in params else "per-layer")


def kernels_of(params: dict) -> dict[str, Kernel]:
    """Each searched component's kernel of ablation weights over layers."""
    kernels = {}
    for component in COMPONENTS:
        if f"{component}.max_weight" in params:
            max_weight = params[f"{component}.max_weight"]
            kernels[component] = Kernel(
                max_weight=max_weight,
                max_weight_position=params[f"{component}.max_weight_position"],
                min_weight=params[f"{component}.min_weight_fraction"] * max_weight,
                min_weight_distance=params[f"{component}.min_weight_distance"],
            )
    return kernels


def edits_from_params(params: dict, basis: torch.Tensor) -> list[Edit]:
    """The edits a trial's parameters describe: one per (layer, component) with a non-zero weight.

    The parameters and the study's direction basis say everything: which components were searched,
    the direction scope (a searched scope is a parameter; a fixed global scope leaves a direction
    index; per-layer, none) and the projection (a parameter when searched; fixed methods store
    their directions ready). So a stored trial rebuilds the same edits whatever flags the command
    that saves it was given.
    """
    directions = directions_at(basis, params.get("direction_projection", 0.0))
    num_layers = directions.shape[0]
    shared = (
        interpolate_direction(directions, params["direction_index"])
        if direction_scope_of(params) == "global"
        else None
    )
    edits = []
    for component, kernel in kernels_of(params).items():
        for layer, weight in enumerate(kernel.weights(num_layers)):
            if weight > 0:
                direction = shared if shared is not None else directions[layer]
                edits.append(Edit(layer, component, direction, weight))
    return edits
