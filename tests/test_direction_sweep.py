"""benchmarks/direction_sweep.py: the subspace a sweep removes beside the refusal direction."""

import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "direction_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "direction_sweep.py"
)
direction_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(direction_sweep)


def test_the_subspace_is_the_direction_then_what_else_sets_the_harmful_prompts_apart():
    torch.manual_seed(0)
    hidden = 16
    harmless = torch.randn(200, hidden) * 0.1 + 3.0 * torch.eye(hidden)[0]  # their mean: along axis 0
    harmful = torch.randn(200, hidden) * 0.1 + 3.0 * torch.eye(hidden)[0]
    harmful[:, 1] += 2.0  # the refusal direction, axis 1
    harmful[:100, 2] += 4.0  # half of the harmful prompts also lie along axis 2
    direction = torch.nn.functional.normalize(harmful.mean(0) - harmless.mean(0), dim=0)
    removed = direction_sweep.subspace(harmful, harmless, direction, rank=3)
    assert removed.shape == (3, hidden)
    assert torch.equal(removed[0], direction)
    torch.testing.assert_close(removed @ removed.T, torch.eye(3), atol=1e-5, rtol=0)
    unit_harmless_mean = torch.nn.functional.normalize(harmless.mean(0), dim=0)
    assert (removed[1:] @ unit_harmless_mean).abs().max() < 1e-5
    # The second is what the direction (which leans on axis 2 too) leaves of axis 2, up to sign.
    axis2 = torch.eye(hidden)[2]
    left = torch.nn.functional.normalize(axis2 - (axis2 @ direction) * direction, dim=0)
    assert (removed[1] @ left).abs() > 0.99


def test_rank_one_is_the_direction_alone():
    harmful, harmless = torch.randn(8, 4), torch.randn(8, 4)
    direction = torch.nn.functional.normalize(torch.randn(4), dim=0)
    assert torch.equal(direction_sweep.subspace(harmful, harmless, direction, rank=1), direction[None])
