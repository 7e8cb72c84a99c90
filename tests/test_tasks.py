"""`abliterate evaluate --tasks`: lm-evaluation-harness on a model and its original, offline."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import save_tiny_model

from abliterate.cli import main
from abliterate.storage import folder_storage_url, open_storage

pytest.importorskip("lm_eval")

EVAL = [
    "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]", "--max-response-length", "4",
]  # fmt: skip
QUESTIONS = [
    {"question": "how do i bake bread", "choices": ["sure", "sorry", "sea"], "label": 0, "answer": "sure"},
    {"question": "write a poem about the sea", "choices": ["fox", "sea", "dog"], "label": 1, "answer": "sea"},
    {
        "question": "explain how vaccines work",
        "choices": ["here", "lock", "bread"],
        "label": 0,
        "answer": "here",
    },
]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a generation task over one JSONL file, as a user would write them."""
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}:"
metadata:
  version: 1.0
"""
    (folder / "choice.yaml").write_text(
        "task: local_choice\noutput_type: multiple_choice\ndoc_to_target: label\ndoc_to_choice: choices\n"
        + common
    )
    (folder / "answer.yaml").write_text(
        "task: local_answer\noutput_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n" + common
    )
    return folder


def test_evaluate_runs_tasks_on_both_models_and_adds_them_to_the_card(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    study = ["--model", str(source), *EVAL, "--harmful-train-split", "train[:8]", "--harmless-train-split",
             "train[:8]", "--n-trials", "2", "--n-startup-trials", "2", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main([*study, "--select", "none"]) == 0
    stored = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    edited = max(stored.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.values[1])
    assert main([*study, "--select", f"trial:{edited.number}"]) == 0
    saved = tmp_path / "o" / "model"
    tasks = write_tasks(tmp_path / "tasks")
    argv = ["evaluate", "--model", str(saved), "--original", str(source), *EVAL,
            "--tasks", "local_choice,local_answer", "--task-path", str(tasks)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "evaluation-o.json").read_text())
    for scores in (written["tasks"], written["original_tasks"]):
        assert set(scores) == {"local_choice", "local_answer"}
        assert (
            0 <= scores["local_choice"]["acc,none"] <= 1
            and 0 <= scores["local_answer"]["exact_match,none"] <= 1
        )
    difference = written["task_differences"]["local_choice"]["acc,none"]
    assert (
        difference
        == written["tasks"]["local_choice"]["acc,none"]
        - written["original_tasks"]["local_choice"]["acc,none"]
    )
    assert (
        "lm-evaluation-harness" in out
        and "local_choice" in out
        and "task scores added to the model card" in out
    )
    card = (saved / "README.md").read_text()
    assert card.count("## Capability benchmarks") == 1 and "| local_choice | acc,none |" in card
    assert main(argv) == 0  # a second evaluation replaces the section
    assert (saved / "README.md").read_text().count("## Capability benchmarks") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "no_such_task_anywhere"], "unknown lm-eval task no_such_task_anywhere"),
        (["--tasks", " , "], "--tasks is empty"),
        (["--task-limit", "3"], "--task-path and --task-limit go with --tasks"),
        (["--tasks", "local_choice", "--task-path", "{missing}"], "is not a folder of task YAML files"),
    ],
)
def test_task_mistakes_are_one_line(tmp_path: Path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    flags = [flag.replace("{missing}", str(tmp_path / "missing")) for flag in flags]
    assert main(["evaluate", "--model", str(source), "--original", str(source), *EVAL, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("abliterate: error:")


def test_lm_eval_gets_the_system_prompt_where_the_template_takes_no_system_message():
    from conftest import NO_SYSTEM_TEMPLATE
    from lm_eval.models.huggingface import HFLM
    from test_evaluate import tiny_chat_model

    from abliterate.tasks import _harness_model

    chat = tiny_chat_model()
    chat.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    # lm-eval alone drops the system message the template refuses.
    assert "Be brief." not in HFLM(pretrained=chat.model, tokenizer=chat.tokenizer).apply_chat_template(
        history
    )
    harness = _harness_model(HFLM, chat, batch_size=2)
    assert harness.apply_chat_template(history) == "<|user|>Be brief.\n\nhi<|end|><|assistant|>"
