"""The quality benchmark's metric: Pareto fronts and their hypervolume (benchmarks/quality.py)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "quality", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_the_front_keeps_only_points_nothing_beats():
    points = [(0.5, 0.2), (0.1, 0.9), (0.5, 0.3), (0.6, 0.1), (0.2, 0.9), (0.1, 0.95)]
    assert quality.pareto(points) == [(0.1, 0.9), (0.5, 0.2), (0.6, 0.1)]


def test_hypervolume_is_the_area_the_front_dominates_up_to_one_one():
    assert quality.hypervolume([]) == 0.0
    assert quality.hypervolume([(0.0, 0.0)]) == 1.0
    assert quality.hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    # Two steps: (1 - 0.2) * (1 - 0.6) + (1 - 0.6) * (0.6 - 0.1)
    assert quality.hypervolume([(0.2, 0.6), (0.6, 0.1), (0.7, 0.7)]) == pytest.approx(0.32 + 0.2)


def test_kl_beyond_one_counts_as_one():
    assert quality.hypervolume([(0.0, 5.0)]) == 0.0
    assert quality.hypervolume([(0.5, 5.0), (0.5, 0.5)]) == pytest.approx(0.25)


def test_a_run_can_be_cut_at_a_trial_count_or_a_time():
    run = {"eval_prompts": 10, "trials": [
        {"index": 0, "refusals": 5, "kl": 0.1, "done_seconds": 10.0},
        {"index": 1, "refusals": 0, "kl": 0.2, "done_seconds": 20.0},
    ]}  # fmt: skip
    assert quality.scaled_points(run) == [(0.5, 0.1), (0.0, 0.2)]
    assert quality.scaled_points(run, until_trial=1) == [(0.5, 0.1)]
    assert quality.scaled_points(run, until_seconds=15.0) == [(0.5, 0.1)]


def test_the_report_gives_each_judges_hypervolume_side_by_side():
    judged = {"index": 0, "refusals": 5, "kl": 0.5, "done_seconds": 1.0,
              "by_judge": {"markers": 0, "classifier": 5, "disagreements": 5}}  # fmt: skip
    skipped = {"index": 1, "refusals": 10, "kl": 0.9, "done_seconds": 2.0}  # refusals not counted
    run = {"label": "both", "seed": 0, "eval_prompts": 10, "baseline_refusals": 10, "wall_seconds": 3.0,
           "baseline_by_judge": {"markers": 9, "classifier": 10, "disagreements": 1}, "trials": [judged, skipped]}  # fmt: skip
    text = quality.report(
        [{"trials": 40, "date": "d", "device": "cpu", "model": "m", "command": "c", "runs": [run]}]
    )
    assert "| both | 40 | markers | 9 | 0.500 | 0.500 |" in text  # 0/10 refusals at KL 0.5
    assert "| both | 40 | classifier | 10 | 0.250 | 0.250 |" in text  # 5/10 at KL 0.5


def _run(label, trials, wall, seed=0):
    points = [
        {"index": i, "refusals": 5 - i, "kl": 0.1 * (i + 1), "done_seconds": 10.0 * (i + 1)}
        for i in range(trials)
    ]
    return {"label": label, "seed": seed, "eval_prompts": 10, "baseline_refusals": 10, "wall_seconds": wall,
            "trials": points}  # fmt: skip


def test_a_run_stopped_short_of_its_budget_says_how_far_it_got():
    record = {"trials": 4, "date": "d", "device": "cpu", "model": "m", "command": "c",
              "runs": [_run("ours", 4, 40.0), _run("ours", 2, 20.0, seed=1)]}  # fmt: skip
    text = quality.report([record])
    assert "| ours | 4 | 0.660, 0.530 (2 trials) |" in text


def test_the_report_can_read_every_run_at_the_count_the_slowest_reached():
    record = {"trials": 4, "date": "d", "device": "cpu", "model": "m", "command": "c",
              "runs": [_run("ours", 4, 40.0), _run("slow", 2, 20.0)]}  # fmt: skip
    text = quality.report([record], until_trial=2)
    assert "| ours | 2 | 0.530 |" in text  # its first two trials only
    assert "| slow | 2 | 0.530 |" in text  # no longer short of the (cut) budget
    assert "ours seed 0 (2 trials" in text  # the fronts are cut too


def test_a_resumed_run_has_no_wall_time_and_is_left_out_of_equal_time():
    timed = {"trials": 4, "date": "d", "device": "cpu", "model": "m", "command": "c",
             "runs": [_run("heretic", 4, 25.0), _run("ours", 4, 40.0)]}  # fmt: skip
    assert "At equal wall time" in quality.report([timed])
    assert "| ours | 4 | 2 | 0.530 | 0.530 |" in quality.report([timed])  # two trials done by 25 s
    resumed = {**timed, "runs": [_run("heretic", 4, None), _run("ours", 4, 40.0)]}
    assert "At equal wall time" not in quality.report([resumed])


def test_abliterix_gets_the_same_model_prompts_markers_and_budget(tmp_path):
    import argparse

    from abliterate.judge import default_refusal_markers

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

    args = argparse.Namespace(
        model=Path("/models/refuser"), heretic_startup=None, trials=40, eval_prompts=48,
        dtype="float32", batch_size=0, max_response_length=64,
    )  # fmt: skip
    config = tomllib.loads(quality.abliterix_config(3, args, tmp_path))
    assert config["seed"] == 3 and config["non_interactive"] is True
    assert config["system_prompt"] == quality.SYSTEM_PROMPT
    assert config["model"] == {
        "model_id": "/models/refuser",
        "dtype_fallback_order": ["float32"],
        "device_map": "auto",
    }
    assert config["inference"] == {"batch_size": 64, "max_gen_tokens": 64}
    assert config["optimization"]["num_trials"] == 40 and config["optimization"]["num_warmup_trials"] == 15
    assert config["detection"]["compliance_markers"] == default_refusal_markers()
    assert config["target_eval_prompts"]["split"] == "test[:48]"
    for key, kind, split in [
        ("target_prompts", "harmful", "train"),
        ("benign_eval_prompts", "harmless", "test"),
    ]:
        folder = Path(config[key]["dataset"])
        assert folder == tmp_path / "prompts" / kind
        source = quality.PROMPTS / f"{kind}_{'train' if split == 'train' else 'eval'}.txt"
        assert (folder / f"{split}.txt").read_text() == source.read_text()
