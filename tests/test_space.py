"""The search space: parameter bounds, sampling, warm starts, and the edits parameters mean."""

import optuna
import pytest
import torch

from abliterate.directions import directions_at
from abliterate.space import RANGES, SearchSpace, edits_from_params


def params(scope="global", **overrides):
    values = {
        "direction_scope": scope,
        "direction_index": 2.5,
        "attn.max_weight": 1.0, "attn.max_weight_position": 3.0, "attn.min_weight_fraction": 0.5,
        "attn.min_weight_distance": 1.0,
        "mlp.max_weight": 1.2, "mlp.max_weight_position": 5.0, "mlp.min_weight_fraction": 0.0,
        "mlp.min_weight_distance": 2.0,
    }  # fmt: skip
    values.update(overrides)
    return values


def test_edits_follow_the_kernels():
    directions = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    edits = edits_from_params(params(), directions)
    by_key = {(edit.layer, edit.component): edit for edit in edits}
    assert {layer for layer, component in by_key if component == "attn"} == {2, 3, 4}
    assert by_key[(3, "attn")].weight == pytest.approx(1.0)
    assert by_key[(2, "attn")].weight == pytest.approx(0.5)
    assert {layer for layer, component in by_key if component == "mlp"} == {
        4,
        5,
    }  # weight 0 at layer 3: untouched
    assert by_key[(4, "mlp")].weight == pytest.approx(0.6)
    shared = edits[0].direction
    assert all(torch.equal(edit.direction, shared) for edit in edits)


def test_per_layer_scope_uses_each_layers_direction():
    directions = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    for edit in edits_from_params(params("per-layer"), directions):
        assert torch.equal(edit.direction, directions[edit.layer])


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_a_trial_of_a_fixed_scope_rebuilds_its_own_edits(scope):
    """Stored parameters say their scope and components; no flag of a later command changes them."""
    directions = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    stored = SearchSpace(num_layers=6, components=("mlp",), direction_scope=scope).sample(trial)
    edits = edits_from_params(stored, directions)
    assert edits and {edit.component for edit in edits} == {"mlp"}
    per_layer = all(torch.equal(edit.direction, directions[edit.layer]) for edit in edits)
    assert per_layer == (scope == "per-layer")


def test_a_global_scope_suggests_every_parameter_but_the_scope():
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    sampled = SearchSpace(num_layers=8, direction_scope="global").sample(trial)
    assert set(sampled) == set(params()) - {"direction_scope"}
    assert 0 <= sampled["direction_index"] <= 7


def test_a_searched_scope_samples_the_direction_index_in_every_trial():
    """Multivariate TPE models conditional parameters poorly: per-layer trials draw the index too."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    scopes = set()
    for _ in range(20):
        sampled = SearchSpace(num_layers=8).sample(study.ask())
        assert "direction_index" in sampled
        scopes.add(sampled["direction_scope"])
    assert scopes == {"global", "per-layer"}


def test_a_per_layer_scope_has_no_direction_index():
    study = optuna.create_study(directions=["minimize", "minimize"])
    assert "direction_index" not in SearchSpace(num_layers=8, direction_scope="per-layer").sample(study.ask())


def test_bounds_are_fractions_of_the_last_layer():
    space = SearchSpace(num_layers=11)  # last layer index 10
    calibrated = RANGES["calibrated"]
    assert space.bounds("direction_index") == pytest.approx((10 * calibrated.direction_index[0], 10.0))
    assert space.bounds("max_weight_position") == pytest.approx((6.0, 10.0))
    assert space.bounds("min_weight_distance") == pytest.approx((1.0, 6.0))  # never below one layer
    assert space.bounds("max_weight") == calibrated.max_weight  # weights are not layers
    wide = SearchSpace(num_layers=11, ranges="wide")
    assert wide.bounds("max_weight_position") == pytest.approx((3.0, 10.0))
    assert wide.bounds("min_weight_distance") == pytest.approx((1.0, 10.0))


@pytest.mark.parametrize("ranges", sorted(RANGES))
def test_sampled_values_stay_within_their_bounds(ranges):
    space = SearchSpace(num_layers=7, ranges=ranges)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(1))
    for _ in range(30):
        sampled = space.sample(study.ask())
        for name, value in sampled.items():
            if name == "direction_scope":
                continue
            low, high = space.bounds(name.rpartition(".")[2])
            assert low <= value <= high


@pytest.mark.parametrize("scope", ["search", "global"])
def test_warm_starts_are_one_direction_at_weight_one_over_every_layer(scope):
    space = SearchSpace(num_layers=11, direction_scope=scope)
    starts = space.warm_starts()
    indices = [start["direction_index"] for start in starts]
    low, high = space.bounds("direction_index")
    assert len(set(indices)) == 4 and all(low <= index <= high for index in indices)
    directions = torch.nn.functional.normalize(torch.randn(11, 8), dim=-1)
    for start in starts:
        assert start.get("direction_scope", "global") == "global"
        assert set(start) == set(space.sample(optuna.create_study(directions=["minimize"] * 2).ask()))
        edits = edits_from_params(start, directions)
        # The kernel peaks at layer 6 (the lowest peak allowed) and reaches 6 layers: every layer.
        assert {edit.layer for edit in edits} == set(range(11))
        assert all(edit.weight == pytest.approx(1.0) for edit in edits)
        assert all(torch.equal(edit.direction, edits[0].direction) for edit in edits)


def test_warm_starts_take_their_directions_at_the_given_depths_kept_inside_the_range():
    space = SearchSpace(num_layers=11, warm_start_depths=(0.5, 0.3, 0.1, 1.0))
    assert [start["direction_index"] for start in space.warm_starts()] == [5.0, 3.0, 2.0, 10.0]  # 0.1 -> 0.2
    wide = SearchSpace(num_layers=11, ranges="wide", warm_start_depths=(1.0,))
    assert [start["direction_index"] for start in wide.warm_starts()] == [wide.bounds("direction_index")[1]]
    searched = SearchSpace(num_layers=11, projection="choose", warm_start_depths=(0.7, 0.3))
    assert [
        (start["direction_index"], start["direction_projection"]) for start in searched.warm_starts()
    ] == [(7.0, 1.0), (3.0, 1.0), (7.0, 0.0)]


def test_a_per_layer_scope_has_no_warm_starts():
    assert SearchSpace(num_layers=8, direction_scope="per-layer").warm_starts() == []


def test_a_searched_projection_is_sampled_in_every_trial_and_shapes_the_direction():
    space = SearchSpace(num_layers=6, direction_scope="per-layer", projection="search")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    harmless = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    basis = torch.stack([torch.nn.functional.normalize(torch.randn(6, 8) + harmless, dim=-1), harmless])
    for _ in range(5):
        sampled = space.sample(study.ask())
        projection = sampled["direction_projection"]
        assert 0.0 <= projection <= 1.0
        expected = directions_at(basis, projection)
        for edit in edits_from_params(sampled, basis):
            assert torch.equal(edit.direction, expected[edit.layer])
    fixed = SearchSpace(num_layers=6, direction_scope="per-layer").sample(study.ask())
    assert "direction_projection" not in fixed


def test_a_chosen_projection_is_the_mean_difference_or_the_projected_direction():
    space = SearchSpace(num_layers=6, direction_scope="per-layer", projection="choose")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    harmless = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    basis = torch.stack([torch.nn.functional.normalize(torch.randn(6, 8) + harmless, dim=-1), harmless])
    drawn = set()
    for _ in range(12):
        sampled = space.sample(study.ask())
        drawn.add(sampled["direction_projection"])
        expected = directions_at(basis, sampled["direction_projection"])
        for edit in edits_from_params(sampled, basis):
            assert torch.equal(edit.direction, expected[edit.layer])
    assert drawn == {0.0, 1.0}
    assert isinstance(
        study.trials[0].distributions["direction_projection"], optuna.distributions.CategoricalDistribution
    )


@pytest.mark.parametrize("projection", ["search", "choose"])
def test_warm_starts_of_a_searched_projection_try_both_ends(projection):
    space = SearchSpace(num_layers=11, direction_scope="global", projection=projection)
    starts = space.warm_starts()
    assert [start["direction_projection"] for start in starts] == [1.0, 1.0, 1.0, 1.0, 0.0]
    # The unprojected one repeats the first depth's direction.
    assert starts[4]["direction_index"] == starts[0]["direction_index"]
    assert all(set(start) == set(space.sample(optuna.create_study().ask())) for start in starts)
