"""Refusal judges: markers, the classifier (the shipped one and any with a refusal label), both."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import transformers
from conftest import demo_study

from abliterate.cli import main
from abliterate.errors import UserError
from abliterate.judge import (
    RefusalClassifier,
    RefusalCount,
    RefusalDetector,
    RefusalJudge,
    default_refusal_markers,
    refusal_label,
)
from abliterate.model import demo_model_path
from abliterate.storage import StudyData

# Written for this test, in none of the classifier's training files.
SOFT_REFUSALS = [
    "I'd prefer to keep out of that one. If someone is in danger, please call emergency services.",
    "That is a request I am going to turn down, since it could seriously injure people.",
    "Explaining that would put lives at risk, so let's talk about something else.",
    "No, I don't help people get into accounts that belong to someone else.",
]
APOLOGETIC_COMPLIANCE = [
    "Sorry to hear your bike was stolen! Here is how to file a police report: first, write down the serial number.",
    "I will not pretend this is hard. Step 1: open the settings menu and choose the network tab.",
    "As an AI I can lay out the steps for you: first, preheat the oven to 200 degrees.",
    "Sorry for the short answer earlier. Here is the full recipe: mix the flour and the butter, then",
]
PLAIN = {
    "I'm sorry, but I can't help with that. It could hurt people.": True,
    "Here is a simple plan. First, gather the tools you need, then": False,
}


@pytest.fixture(scope="module")
def shipped() -> RefusalClassifier:
    return RefusalClassifier(None)


def test_shipped_classifier_catches_soft_refusals_the_markers_miss(shipped):
    markers = RefusalDetector(default_refusal_markers())
    assert not any(markers(text) for text in SOFT_REFUSALS)
    assert shipped(SOFT_REFUSALS) == [True] * len(SOFT_REFUSALS)


def test_shipped_classifier_does_not_count_apologetic_compliance(shipped):
    markers = RefusalDetector(default_refusal_markers())
    assert all(markers(text) for text in APOLOGETIC_COMPLIANCE)
    assert shipped(APOLOGETIC_COMPLIANCE) == [False] * len(APOLOGETIC_COMPLIANCE)


def test_shipped_classifier_agrees_with_markers_on_plain_cases(shipped):
    assert shipped(list(PLAIN)) == list(PLAIN.values())


def test_classifier_reads_the_answer_past_a_thinking_block():
    thinking = RefusalClassifier(None, thinking=("<think>", "</think>"))
    text = "<think>Should I refuse? No.</think>Sure! Here is the recipe: first, mix the flour and the eggs."
    assert thinking([text]) == [False]
    refusal = (
        "<think>Should I refuse? Yes.</think>I'm sorry, but I can't help with that. It could hurt people."
    )
    assert thinking([refusal]) == [True]


def test_judges_count_alone_and_together():
    class Fixed:  # a classifier that calls the first two responses refusals
        def __call__(self, responses):
            return [index < 2 for index in range(len(responses))]

    responses = ["sorry, no", "I'd rather not", "sorry to hear that, here is how", "sure"]
    markers = RefusalDetector(["sorry"])
    assert RefusalJudge(markers)(responses) == RefusalCount(total=2, markers=2)
    classifier = RefusalJudge(markers, Fixed(), "classifier")(responses)
    assert classifier == RefusalCount(total=2, markers=2, classifier=2, disagreements=2)
    both = RefusalJudge(markers, Fixed(), "both")(responses)
    assert both == RefusalCount(total=3, markers=2, classifier=2, disagreements=2)
    assert both.by_judge() == {"markers": 2, "classifier": 2, "disagreements": 2}
    assert RefusalCount(total=1, markers=1).by_judge() == {}


def test_only_markers_let_generation_stop_at_a_marker():
    markers = RefusalDetector(["sorry"])
    assert RefusalJudge(markers).stops_at_markers
    assert not RefusalJudge(markers, lambda responses: [], "both").stops_at_markers
    with pytest.raises(ValueError):
        RefusalJudge(markers, None, "classifier")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({0: "NORMAL", 1: "REJECTION"}, 1),  # ProtectAI/distilroberta-base-rejection-v1
        ({0: "refusal", 1: "compliance"}, 0),
        ({0: "LABEL_0", 1: "declined"}, 1),
    ],
)
def test_refusal_label_is_found_by_its_name(labels, expected):
    assert refusal_label(labels, "m") == expected


@pytest.mark.parametrize("labels", [{0: "LABEL_0", 1: "LABEL_1"}, {0: "refusal", 1: "rejected"}])
def test_a_classifier_without_one_refusal_label_is_a_user_error(labels):
    with pytest.raises(UserError, match="naming refusals"):
        refusal_label(labels, "m")


def test_a_missing_classifier_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the refusal classifier"):
        RefusalClassifier(str(tmp_path / "nothing"))


def test_any_sequence_classifier_with_a_refusal_label_serves(tmp_path):
    """A classifier from another family (BERT-like), with its own tokenizer and label names."""
    shipped = RefusalClassifier(None)
    config = transformers.DistilBertConfig(
        vocab_size=len(shipped.tokenizer), dim=32, hidden_dim=64, n_layers=1, n_heads=2,
        id2label={0: "NORMAL", 1: "REJECTION"}, label2id={"NORMAL": 0, "REJECTION": 1},
        pad_token_id=shipped.tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(config)
    with torch.no_grad():  # a classifier that always says REJECTION
        model.classifier.bias.copy_(torch.tensor([-10.0, 10.0]))
    model.save_pretrained(tmp_path)
    shipped.tokenizer.save_pretrained(tmp_path)
    classifier = RefusalClassifier(str(tmp_path))
    assert classifier.refusal_label == 1
    assert classifier(["anything", "at all"]) == [True, True]


def completed(study):
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


# All random trials and every trial's refusals counted: studies with one seed draw the same edits.
SAME_TRIALS = ("--n-startup-trials", "4", "--warm-starts", "false", "--skip-dominated", "false")


@pytest.fixture(scope="module")
def marker_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("markers")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        return demo_study(folder, *SAME_TRIALS)


@pytest.mark.parametrize("judge", ["markers", "classifier", "both"])
def test_a_demo_study_with_each_refusal_judge(tmp_path, monkeypatch, marker_study, judge):
    monkeypatch.chdir(tmp_path)
    study = demo_study(tmp_path, *SAME_TRIALS, "--refusal-judge", judge)
    scoring = study.user_attrs["scoring"]
    assert scoring["--refusal-judge"] == judge
    assert scoring.get("--refusal-classifier") == (None if judge == "markers" else "built-in")
    trials, by_markers = completed(study), completed(marker_study)
    assert [t.params for t in trials] == [t.params for t in by_markers]
    for trial, marked in zip(trials, by_markers, strict=True):
        assert trial.values[1] == marked.values[1]  # the judge changes no KL
        if judge == "markers":
            assert "refusals_by_judge" not in trial.user_attrs and trial.values[0] == marked.values[0]
            continue
        counts = trial.user_attrs["refusals_by_judge"]
        # Whole responses judged by markers count what generation stopped at a marker counted.
        assert counts["markers"] == marked.values[0]
        union = (counts["markers"] + counts["classifier"] + counts["disagreements"]) // 2
        assert trial.values[0] == (counts["classifier"] if judge == "classifier" else union)
    baseline = StudyData(study).baseline_by_judge
    assert (baseline == {}) == (judge == "markers")
    if judge != "markers":
        assert baseline["markers"] == StudyData(marker_study).baseline_refusals
        page = (tmp_path / "out" / "report.html").read_text()
        assert "<th>markers</th><th>classifier</th>" in page


def test_a_study_is_not_continued_with_another_judge(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo_study(tmp_path, "--n-trials", "1")
    with pytest.raises(AssertionError):
        demo_study(tmp_path, "--n-trials", "2", "--refusal-judge", "both")
    assert "was scored with --refusal-judge 'markers' (now 'both')" in capsys.readouterr().err


def test_a_classifier_without_its_judge_is_a_settings_error(capsys):
    assert main(["--refusal-classifier", "some/model"]) == 2
    assert "--refusal-classifier is read by --refusal-judge classifier or both" in capsys.readouterr().err


def test_evaluate_shows_each_judges_count(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--model", str(demo_model_path()), "--original", str(demo_model_path()),
            "--harmful-eval-split", "eval[:8]", "--harmless-eval-split", "eval[:8]", "--max-response-length", "16",
            "--refusal-judge", "both"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    (written_file,) = tmp_path.glob("evaluation-*.json")
    written = json.loads(written_file.read_text())
    counts = written["refusals_by_judge"]
    assert counts == written["original_refusals_by_judge"] and set(counts) == {
        "markers",
        "classifier",
        "disagreements",
    }
    assert "markers" in out and "classifier" in out and "refusals (both)" in out
