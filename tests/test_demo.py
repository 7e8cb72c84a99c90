"""The built-in demo model: it refuses, its refusal is linear, and the pipeline removes it."""

from __future__ import annotations

import functools
import json

import optuna
import pytest
import torch
import transformers
from conftest import demo_study
from safetensors.torch import load_file

from abliterate.ablation import ablate_
from abliterate.cli import main
from abliterate.components import find_components
from abliterate.directions import capture_residuals, refusal_directions
from abliterate.evaluate import Evaluator
from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import demo_model_path, load_chat_model
from abliterate.prompts import builtin_prompts
from abliterate.space import SearchSpace
from abliterate.storage import StudyData

pytestmark = pytest.mark.slow


@functools.cache
def demo():
    return load_chat_model(None, dtypes=["float32"], device_map="cpu")


def evaluator(harmful, harmless, max_length=32) -> Evaluator:
    return Evaluator(demo(), harmful, harmless, RefusalDetector(default_refusal_markers()), 50, max_length)


def test_demo_model_is_small_and_shipped():
    folder = demo_model_path()
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size < 10 * 1024**2
    assert transformers.AutoConfig.from_pretrained(folder).model_type == "llama"
    assert demo().tokenizer.chat_template


def test_demo_model_refuses_harmful_and_answers_harmless():
    # The shipped model refuses 93% / 4% of these (demo/NOTES.md).
    harmful, harmless = builtin_prompts("harmful", "eval"), builtin_prompts("harmless", "eval")
    refused_harmful = evaluator(harmful, harmless[:1]).count_refusals()
    answers = evaluator(harmless, harmless[:1]).responses()
    refused_harmless = sum(RefusalDetector(default_refusal_markers())(answer) for answer in answers)
    assert refused_harmful >= 0.90 * len(harmful)
    assert refused_harmless <= 0.05 * len(harmless)
    assert len(set(answers)) > 0.5 * len(answers), "harmless answers should vary"


def test_one_middle_direction_removes_the_refusal():
    """A middle layer's direction projected out of every layer at weight 1: >= 80% fewer refusals, KL < 1."""
    model = demo()
    editable = find_components(model.model)
    residuals = [
        capture_residuals(model, model.encode(builtin_prompts(name, "train"), 50), editable.layers)
        for name in ("harmful", "harmless")
    ]
    directions = refusal_directions(*residuals)[0]
    score = evaluator(builtin_prompts("harmful", "eval"), builtin_prompts("harmless", "eval"))
    before = score.count_refusals()
    originals = {matrix.name: matrix.parameter.detach().clone() for *_, matrix in editable.matrices()}
    results = {}
    for layer in range(editable.num_layers // 4, 3 * editable.num_layers // 4 + 1):  # the middle half
        try:
            for *_, matrix in editable.matrices():
                ablate_(matrix.view(), directions[layer], 1.0)
            results[layer] = (score.count_refusals(), score.kl())
        finally:
            with torch.no_grad():
                for *_, matrix in editable.matrices():
                    matrix.parameter.copy_(originals[matrix.name])
    working = [layer for layer, (after, kl) in results.items() if after <= 0.2 * before and 0 < kl < 1]
    assert working, f"no middle layer works: {results} (before: {before})"


@pytest.mark.parametrize("stop_check_every", [1, 4])  # a CPU's and a GPU's
def test_fast_evaluation_matches_full_generation(stop_check_every, monkeypatch):
    """Stopping each response at its first marker, checked every step or every few, gives the same
    refusal count and KL as generating it all."""
    score = evaluator(
        builtin_prompts("harmful", "eval")[:60], builtin_prompts("harmless", "eval")[:20], max_length=48
    )
    monkeypatch.setattr(score.model, "stop_check_every", stop_check_every)  # the model is shared
    full = score.responses(stop_early=False)
    stopped = score.responses(stop_early=True)
    assert sum(map(score.judge.markers, stopped)) == sum(map(score.judge.markers, full))
    assert score.count_refusals(stop_early=True) == sum(score.judge.markers(response) for response in full)
    # A stop comes within `stop_check_every` tokens of the first marker: responses are cut short.
    assert sum(map(len, stopped)) < sum(map(len, full))
    assert score.kl() == 0.0


def test_a_short_study_on_the_demo_model_removes_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--n-trials", "16", "--n-startup-trials", "8", "--select", "min-refusals", "--output", str(tmp_path / "out"),
            "--harmful-eval-split", "eval[:40]", "--harmless-eval-split", "eval[:40]", "--max-response-length", "24"]  # fmt: skip
    assert main(argv) == 0
    saved = tmp_path / "out" / "model"
    card = (saved / "README.md").read_text()
    result = json.loads((saved / "abliterate.json").read_text())
    err = capsys.readouterr().err
    baseline = int(err.split("original model: ")[1].split("/")[0])
    assert result["refusals"] < baseline / 2
    assert result["kl"] > 0
    assert "abliterate-demo" in card and f"{result['refusals']}/40" in card
    # The saved model is the trial: scored like the study scored it (same batches, same dtype), it
    # gives the trial's refusals and KL exactly.
    scored = load_chat_model(None, device_map="cpu")
    again = Evaluator(
        scored, builtin_prompts("harmful", "eval")[:40], builtin_prompts("harmless", "eval")[:40],
        RefusalDetector(default_refusal_markers()), 32, 24,
    )  # fmt: skip
    with torch.no_grad():
        weights = load_file(saved / "model.safetensors")
        for name, parameter in scored.model.named_parameters():
            parameter.copy_(weights[name])
    assert (again.count_refusals(), again.kl()) == (result["refusals"], result["kl"])

    model = transformers.AutoModelForCausalLM.from_pretrained(saved)
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("method", ["mean-difference", "projected", "search", "choose"])
def test_a_demo_study_with_each_direction_method(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    # One warm start (two with a searched projection), so that the other trials are drawn.
    study = demo_study(tmp_path, "--direction", method, "--warm-start-depths", "0.5")
    assert study.user_attrs["scoring"]["--direction"] == method
    assert StudyData(study).directions.shape == (2, 6, 192)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    searched = ["direction_projection" in trial.params for trial in trials]
    assert searched == [method in ("search", "choose")] * 4
    if method == "choose":
        assert {trial.params["direction_projection"] for trial in trials} == {0.0, 1.0}  # the warm starts


def test_a_demo_study_in_the_wide_space_draws_from_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = demo_study(tmp_path, "--search-space", "wide", "--n-startup-trials", "4")
    space = SearchSpace(num_layers=6, ranges="wide")
    for trial in study.trials:
        drawn = trial.distributions["mlp.max_weight_position"]
        assert (drawn.low, drawn.high) == space.bounds("max_weight_position")  # not the calibrated (3, 5)


def test_a_demo_study_begins_with_its_warm_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = demo_study(tmp_path)  # the defaults: warm starts
    starts = SearchSpace(num_layers=6).warm_starts()
    assert len(starts) == 4 and [trial.params for trial in study.trials] == starts
    searched = demo_study(tmp_path / "searched", "--direction", "search", "--n-trials", "5")
    starts = SearchSpace(num_layers=6, projection="search").warm_starts()
    assert len(starts) == 5 and [trial.params for trial in searched.trials] == starts
    placed = demo_study(tmp_path / "placed", "--warm-start-depths", "1.0,0.2")
    starts = SearchSpace(num_layers=6, warm_start_depths=(1.0, 0.2)).warm_starts()
    assert [trial.params["direction_index"] for trial in placed.trials[:2]] == [5.0, 1.0]
    assert [trial.params for trial in placed.trials[:2]] == starts


def test_a_demo_study_stops_starting_trials_when_its_time_budget_is_spent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    study = demo_study(tmp_path, "--time-budget", "0.01")  # spent while the model loads
    assert not study.trials
    assert "--time-budget spent: 0 of 4 trials finished" in capsys.readouterr().err
