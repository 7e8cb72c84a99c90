"""benchmarks/separation.py: how far apart a direction puts the prompt sets, and the trials by depth."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "separation", Path(__file__).resolve().parents[1] / "benchmarks" / "separation.py"
)
separation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(separation)


def test_cohens_d_is_the_gap_between_the_means_in_pooled_standard_deviations():
    direction = torch.tensor([1.0, 0.0])
    harmful = torch.tensor([[1.0, 5.0], [3.0, -5.0]])  # along the direction: mean 2, variance 2
    harmless = torch.tensor([[-1.0, 0.0], [-3.0, 9.0]])  # mean -2, variance 2
    assert separation.cohens_d(harmful, harmless, direction) == pytest.approx(4 / 2**0.5)


def test_each_layer_is_measured_along_its_own_directions():
    torch.manual_seed(0)
    harmless = torch.randn(64, 2, 4) + torch.tensor([0.0, 5.0, 0.0, 0.0])
    harmful = harmless.clone()
    harmful[:, 0, 0] += 3.0  # layer 0: apart, orthogonally to the harmless mean
    harmful[:, 1, 1] += 0.5  # layer 1: a little, along the harmless mean only
    (plain0, projected0), (plain1, _) = separation.separation(harmful, harmless)
    assert plain0 > 2 and projected0 > 2 and plain0 > 4 * plain1


def test_good_trials_are_counted_by_the_layer_their_direction_came_from(tmp_path):
    def trial(index, refusals, kl, **params):
        return {"index": index, "refusals": refusals, "kl": kl, "params": params}

    runs = [
        {"label": "default", "eval_prompts": 100, "trials": [
            trial(0, 10, 0.1, direction_scope="global", direction_index=2.4),  # good, layer 2
            trial(1, 10, 0.4, direction_scope="global", direction_index=1.6),  # KL too high, layer 2
            trial(2, 30, 0.1, direction_index=4.0),  # too many refusals; a fixed global scope
            trial(3, 0, 0.0, direction_scope="per-layer", direction_index=3.0),  # not a global direction
            trial(4, 0, 0.0, **{"attn.max_weight": 1.0}),  # --direction-scope per-layer
        ]},
        {"label": "heretic", "eval_prompts": 100, "trials": [trial(0, 0, 0.0, direction_index=2.0)]},
    ]  # fmt: skip
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": runs}))
    assert separation.good_trials_by_depth([path], 4, 0.25, 0.25) == {2: (1, 2), 3: (0, 1)}
