"""The pipeline on tiny models: saving, the adapter merge, tokenizers without a pad token."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import ClassVar

import optuna
import pytest
import torch
import transformers
from conftest import NO_SYSTEM_TEMPLATE, save_tiny_model, tiny_model, tiny_study, tiny_tokenizer

from abliterate import pipeline
from abliterate.cli import main
from abliterate.errors import UserError
from abliterate.export import ModelCard, clean_partials
from abliterate.model import ChatModel, left_pad, load_chat_model
from abliterate.settings import Selection
from abliterate.storage import folder_holds_study, folder_storage_url, open_storage
from abliterate.terminal import ask_selection, direction_cell

FAST = tiny_study(2)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny")  # a copy of its own: one test edits its tokenizer


def adapter_and_in_place_saves(folder: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Run the same trial with the adapter and in place; the two saved models' weights."""
    for reset in ("adapter", "gpu-cache"):
        argv = ["--model", str(folder), *FAST, "--reset", reset, "--output", str(tmp_path / reset)]  # fmt: skip
        assert main([*argv, "--select", "none"]) == 0  # the study first: trial:N picks a finished trial
        assert main([*argv, "--select", "trial:1"]) == 0
    return tuple(weights_of(tmp_path / reset / "model") for reset in ("adapter", "gpu-cache"))


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def assert_adapter_save_is_the_in_place_save(source: Path, tmp_path: Path) -> None:
    merged, in_place = adapter_and_in_place_saves(source, tmp_path)
    assert_same_weights(merged, in_place)
    original = weights_of(source)
    assert any(not torch.equal(original[name], merged[name]) for name in original), "nothing was edited"


def test_adapter_run_saves_the_same_weights_as_an_in_place_run(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_adapter_save_is_the_in_place_save(model, tmp_path)


def test_an_adapter_run_of_a_sharded_moe_checkpoint_saves_the_in_place_weights(tmp_path, monkeypatch):
    """The adapter's export merges the edit into the source's shards one by one: the same bytes as an in-place save."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "moe"
    tiny_model("qwen2_moe").save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    assert len(shards) > 2
    # Some repos ship the weights twice; the index names the files that make the model.
    shutil.copy(folder / shards[0], folder / "consolidated.safetensors")
    assert_adapter_save_is_the_in_place_save(folder, tmp_path)
    saved = tmp_path / "adapter" / "model"
    assert sorted(path.name for path in saved.glob("*.safetensors")) == shards
    index = "model.safetensors.index.json"
    assert (saved / index).read_text() == (folder / index).read_text()


def test_an_adapter_run_of_a_pytorch_bin_checkpoint_saves_the_in_place_weights(tmp_path, monkeypatch):
    """Without safetensors files the merge edits a full copy loaded on the CPU: still the in-place bytes."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "bin"
    model = tiny_model("llama")
    # transformers 5 writes only safetensors: write the old format by hand.
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    assert not list(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").is_file()
    assert_adapter_save_is_the_in_place_save(folder, tmp_path)


def test_saved_model_card_and_metadata(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(model), *FAST, "--select", "min-kl", "--output", str(tmp_path / "o")]) == 0
    metadata = json.loads((tmp_path / "o" / "model" / "abliterate.json").read_text())
    card = (tmp_path / "o" / "model" / "README.md").read_text()
    assert metadata["source_model"] == str(model)
    assert f"trial {metadata['trial']}" in card and "## Command" in card
    assert (tmp_path / "o" / ".abliterate").is_file() and (tmp_path / "o" / "study.journal").is_file()


@pytest.mark.parametrize(
    ("source", "hub_id", "front_matter", "link"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "base_model: Qwen/Qwen2.5-7B-Instruct\ntags:",
         "[Qwen/Qwen2.5-7B-Instruct](https://huggingface.co/Qwen/Qwen2.5-7B-Instruct)"),
        ("/models/my-llama", None, "---\ntags:", "`/models/my-llama`"),
    ],
)  # fmt: skip
def test_the_model_card_names_a_hub_base_model_only_for_hub_ids(source, hub_id, front_matter, link):
    card = ModelCard(
        source, 3, {"attn.max_weight": 1.0}, 2, 100, 90, 0.1, "abliterate", hub_id=hub_id
    ).markdown()
    assert card.startswith("---\n") and front_matter in card and f"This model is {link} with" in card
    assert ("base_model:" in card) == (hub_id is not None)


def test_chat_models_know_whether_they_came_from_the_hub(model):
    assert load_chat_model(str(model), dtypes=["float32"], device_map="cpu").hub_id is None
    assert ChatModel(None, None, "Qwen/Qwen2.5-7B-Instruct", None).hub_id == "Qwen/Qwen2.5-7B-Instruct"


def test_rerun_with_more_trials_continues_the_study(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    assert main([*argv, "--n-trials", "3"]) == 0
    assert "resuming study 'tiny': 2 of 3 trials finished" in capsys.readouterr().err


def test_a_study_continued_with_other_scoring_settings_is_refused(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    assert main([*argv, "--n-trials", "3", "--row-norm", "full", "--max-response-length", "5"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: study 'tiny' was scored with --max-response-length '4' (now '5'), "
        "--row-norm 'none' (now 'full'); give the same values to continue it, or pass another --study-name"
    )


def scoring_of(output: Path) -> dict:
    storage = open_storage(folder_storage_url(output))
    return optuna.load_study(study_name="tiny", storage=storage).user_attrs["scoring"]


def test_compile_auto_off_a_cuda_gpu_generates_as_usual_and_pins_that(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]) == 0
    assert "compiles the decoder" not in capsys.readouterr().err
    assert scoring_of(tmp_path / "o")["--compile"] == "false"


class CompileFails:
    """Stands in for a compiled decoder that cannot be built: generation fails while it is on."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = ChatModel.generate

        def generate(chat, *args, **kwargs):
            if chat.compiled_generation:
                self.calls += 1
                raise RuntimeError("inductor: no working C compiler\nmore detail")
            return original(chat, *args, **kwargs)

        monkeypatch.setattr(ChatModel, "generate", generate)
        # As if the model were on one CUDA GPU.
        monkeypatch.setattr("abliterate.compiled.compiled_generation_blocker", lambda *args: None)
        monkeypatch.setattr("abliterate.compiled.enable_compiled_generation", _compile_on)


def _compile_on(chat):
    chat.compiled_generation = True


@pytest.mark.parametrize("reset", ["gpu-cache", "adapter"])
def test_a_compiled_study_runs_our_loop_and_keeps_torch_compiles_caches_in_its_folder(
    model, reset, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("abliterate.CHOSEN_COMPILE_CACHE", None)
    # As if the model were on one CUDA GPU: our greedy loop then runs, uncompiled on the CPU.
    monkeypatch.setattr("abliterate.compiled.compiled_generation_blocker", lambda *args: None)
    argv = ["--model", str(model), *FAST, "--reset", reset, "--select", "none", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    assert scoring_of(tmp_path / "o")["--compile"] == "true"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "o").resolve() / "compile-cache")
    # A place the user chose stays theirs.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr("abliterate.CHOSEN_COMPILE_CACHE", str(tmp_path / "mine"))
    assert main([*argv, "--n-trials", "3"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_compile_auto_drops_a_decoder_that_fails_to_compile(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    failing = CompileFails(monkeypatch)
    assert main(["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "--compile auto: the first generation compiles the decoder" in err
    assert (
        "--compile auto: the compiled decoder failed (RuntimeError: inductor: no working C compiler); "
        "generating without it" in err
    )
    assert failing.calls == 1
    assert scoring_of(tmp_path / "o")["--compile"] == "false"  # the baseline and the trials ran without it


def test_compile_true_that_fails_to_compile_is_one_line(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    CompileFails(monkeypatch)
    argv = ["--model", str(model), *FAST, "--compile", "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: --compile: the compiled decoder failed (RuntimeError: inductor: no working C "
        "compiler); use --compile auto or false"
    )


def test_compile_auto_follows_the_study(model, tmp_path, monkeypatch, capsys):
    """A study begun without the compiled decoder continues without it, even where it could run."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    failing = CompileFails(monkeypatch)  # the decoder could now be compiled (and would fail if it were)
    assert main([*argv, "--n-trials", "3"]) == 0
    assert failing.calls == 0
    assert "compiles the decoder" not in capsys.readouterr().err


def test_a_study_scored_compiled_is_not_continued_without_it(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    storage = open_storage(folder_storage_url(tmp_path / "o"))
    study = optuna.load_study(study_name="tiny", storage=storage)
    study.set_user_attr("scoring", {**study.user_attrs["scoring"], "--compile": "true"})
    assert main([*argv, "--n-trials", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: study 'tiny' was scored with --compile 'true' (now 'false'); "
        "give the same values to continue it, or pass another --study-name"
    )


def test_the_saved_tokenizer_is_the_models_own(tmp_path, monkeypatch):
    """The study pads on the left and may invent a pad token; the saved model keeps the original's choices."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "right-padded"
    tiny_model("llama").save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert main(["--model", str(folder), *FAST, "--select", "min-kl", "--output", str(tmp_path / "o")]) == 0
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "o" / "model")
    assert saved.padding_side == "right" and saved.pad_token is None
    assert saved.chat_template == tokenizer.chat_template


def test_a_save_interrupted_between_its_two_renames_gets_the_earlier_model_back(tmp_path):
    retired = tmp_path / ".model.old-abc123" / "model"
    retired.mkdir(parents=True)
    (retired / "model.safetensors").write_bytes(b"weights")
    (tmp_path / ".model.partial-def456").mkdir()
    clean_partials(tmp_path)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_model(tmp_path):
    from safetensors import SafetensorError

    from abliterate.export import save_model

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"earlier")

    class DiskFull:
        def save_pretrained(self, folder, **options):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    card = ModelCard(source_model="m", trial=0, params={}, refusals=0, eval_prompts=1, baseline_refusals=1, kl=0.1, command="c")  # fmt: skip
    with pytest.raises(
        UserError, match=r"^cannot save the model in .*: Error while serializing: I/O error: No space"
    ):
        save_model(DiskFull(), tiny_tokenizer(), tmp_path, card)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # nothing half-written left
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"earlier"


def test_a_model_folder_may_be_written_with_a_tilde_or_a_trailing_slash(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = [*FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(["--model", "~/tiny", *argv]) == 0
    assert main(["--model", "tiny/", *argv, "--n-trials", "3"]) == 0  # the same model: the study goes on
    assert "resuming study 'tiny': 2 of 3 trials finished" in capsys.readouterr().err


def test_the_chat_puts_the_system_prompt_first():
    chat = ChatModel(None, tiny_tokenizer(), "tiny", None, system_prompt="Be brief.")
    text = chat.format_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    assert text.startswith("<|system|>Be brief.<|end|><|user|>hi") and text.endswith("<|assistant|>")


def test_a_system_prompt_goes_before_the_first_message_where_the_template_takes_no_system_message():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    chat = ChatModel(None, tokenizer, "tiny", None, system_prompt="Be brief.")
    assert not chat.template_takes_system_prompt
    text = chat.format_conversation(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "?"},
        ]
    )
    assert text == "<|user|>Be brief.\n\nhi<|end|><|assistant|>hello<|end|><|user|>?<|end|><|assistant|>"
    assert ChatModel(None, tiny_tokenizer(), "tiny", None).template_takes_system_prompt
    # A template that drops the system message unsaid gets it before the first message too.
    tokenizer.chat_template = (
        "{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    silent = ChatModel(None, tokenizer, "tiny", None, system_prompt="Be brief.")
    assert not silent.template_takes_system_prompt
    assert silent.format("hi") == "<|user|>Be brief.\n\nhi<|end|><|assistant|>"


def test_a_study_says_where_its_system_prompt_goes_and_a_broken_template_is_one_line(
    model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    template = tmp_path / "no-system.jinja"
    template.write_text(NO_SYSTEM_TEMPLATE)
    argv = ["--model", str(model), *FAST, "--system-prompt", "Be brief.", "--select", "none"]
    assert main([*argv, "--chat-template", str(template), "--output", str(tmp_path / "o")]) == 0
    assert "the chat template takes no system message: --system-prompt is put before each prompt" in (
        capsys.readouterr().err
    )
    template.write_text("{{ raise_exception('no user messages please') }}")
    assert main([*argv, "--chat-template", str(template), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "abliterate: error: the chat template of tiny fails (no user messages please); pass a working one "
        "with --chat-template"
    )
    assert "takes no system message" not in err  # it fails for every conversation, not for the system one


def test_selecting_a_trial_that_did_not_finish_is_an_error_and_runs_no_trial(
    model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    output = ["--output", str(tmp_path / "o")]
    assert main(["--model", str(model), *FAST, "--select", "none", *output]) == 0
    capsys.readouterr()
    assert main(["--model", str(model), *FAST[:-2], "--n-trials", "9", "--select", "trial:5", *output]) == 1
    err = capsys.readouterr().err
    assert not re.search(r"^trial +\d+:", err, re.MULTILINE), "a trial ran"
    assert err.splitlines()[-1].startswith(
        "abliterate: error: --select trial:5: the study has no finished trial 5 (it does not exist; 2 finished"
    )
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    assert len(study.trials) == 2


def test_growing_a_study_and_its_failed_trials_are_reported(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = ["--output", str(tmp_path / "o")]
    assert main(["--model", str(model), *FAST, "--select", "none", *output]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    study.add_trial(
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
    )  # as a killed run leaves it
    capsys.readouterr()
    assert main(["--model", str(model), *FAST[:-2], "--n-trials", "3", "--select", "none", *output]) == 0
    err = capsys.readouterr().err
    assert "trial    2: failed, killed or interrupted (its run stopped during the trial)" in err
    assert "growing study 'tiny' from 2 to 3 trials (--n-trials)" in err
    assert re.search(r"^trial +3: ", err, re.MULTILINE)  # the new trial, numbered after the failed one


def test_selecting_a_finished_trial_later_runs_no_new_trials(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = ["--output", str(tmp_path / "o")]
    assert main(["--model", str(model), *FAST, "--select", "none", *output]) == 0
    assert "--select none: no model saved; the study is kept in journal:" in capsys.readouterr().err
    # No --n-trials: the default 200 would run 198 more trials before picking.
    assert main(["--model", str(model), *FAST[:-4], "--select", "trial:1", *output]) == 0
    err = capsys.readouterr().err
    assert not re.search(r"^trial +\d+:", err, re.MULTILINE), "a trial ran"
    assert "saved trial 1, chosen by --select trial:1, to" in err
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    assert len(study.trials) == 2


def test_a_study_that_holds_its_trials_says_so(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    assert main([*argv, "--n-trials", "1"]) == 0
    assert (
        "study 'tiny' already holds 2 finished trials (--n-trials 1): no new trials"
        in capsys.readouterr().err
    )


def test_a_tokenizer_without_pad_token_pads_with_end_of_sequence():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    left_pad(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    tokenizer.pad_token = tokenizer.eos_token = None
    left_pad(tokenizer)
    assert tokenizer.pad_token == tokenizer.unk_token


def test_chat_reads_lines_until_end_of_input(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello there\nwrite a poem\n"))
    assert (
        main(["--model", str(model), *FAST, "--select", "knee", "--chat", "--output", str(tmp_path / "o")])
        == 0
    )
    assert capsys.readouterr().out.count("\n") >= 2  # one reply a line


def test_a_chat_template_file_stands_in_for_a_missing_one(model, tmp_path):
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").rename(tmp_path / "template.jinja")
    chat = load_chat_model(
        str(model), dtypes=["float32"], device_map="cpu", chat_template=tmp_path / "template.jinja"
    )
    assert chat.format("hello").endswith("<|assistant|>")


def test_on_a_terminal_the_user_picks_the_trial(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = ["no-such-trial", "min-kl"]
    monkeypatch.setattr("builtins.input", lambda prompt="": answers.pop(0))
    assert main(["--model", str(model), *FAST, "--output", str(tmp_path / "o")]) == 0
    assert answers == []  # the first answer was refused, the second taken
    assert "not one of the trials above: no-such-trial" in capsys.readouterr().out
    assert (tmp_path / "o" / "model" / "abliterate.json").is_file()


def test_the_question_takes_a_trial_number_or_a_way_to_pick_one(monkeypatch, capsys):
    front = [optuna.trial.create_trial(values=[3, 0.2], params={}, distributions={})]
    front[0].number = 7
    answers = ["trial:7", "max-kl:abc", "8", "max-kl:0.5", "7", ""]
    monkeypatch.setattr("builtins.input", lambda prompt="": answers.pop(0))
    assert ask_selection(front) == Selection("max-kl", 0.5)
    assert ask_selection(front) == Selection("trial", 7)
    assert ask_selection(front) == Selection("knee")
    assert capsys.readouterr().out.count("not one of the trials above") == 3


class FakeHub:
    """Stands in for huggingface_hub.HfApi and records what an upload sent."""

    calls: ClassVar[list[tuple]] = []
    fail = False

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message):
        if self.fail:
            raise ConnectionError("the hub did not answer")
        self.calls.append(
            ("upload_folder", repo_id, sorted(path.name for path in Path(folder_path).iterdir()))
        )


@pytest.fixture
def online_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], False
    return FakeHub


def test_push_to_hub_uploads_the_saved_folder_to_a_private_repo(
    model, tmp_path, monkeypatch, online_hub, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--select", "min-kl", "--output", str(tmp_path / "o"), "--push-to-hub", "me/tiny-abliterated"]  # fmt: skip
    assert main(argv) == 0
    (create, repo, private, exist_ok), (upload, uploaded_repo, files) = online_hub.calls
    assert (create, repo, private, exist_ok) == ("create_repo", "me/tiny-abliterated", True, True)
    assert (upload, uploaded_repo) == ("upload_folder", "me/tiny-abliterated")
    assert {"model.safetensors", "README.md", "abliterate.json", "config.json"} <= set(files)
    assert "uploaded to https://huggingface.co/me/tiny-abliterated" in capsys.readouterr().err


def test_a_failed_upload_is_one_line_and_keeps_the_saved_model(
    model, tmp_path, monkeypatch, online_hub, capsys
):
    monkeypatch.chdir(tmp_path)
    online_hub.fail = True
    argv = ["--model", str(model), *FAST, "--select", "min-kl", "--output", str(tmp_path / "o"), "--push-to-hub", "me/x", "--hub-private", "false"]  # fmt: skip
    assert main(argv) == 1
    assert online_hub.calls == [("create_repo", "me/x", False, True)]
    saved = tmp_path / "o" / "model"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"abliterate: error: cannot upload to me/x: the hub did not answer; the model is saved in "
        f"{saved}, and the same command uploads it again"
    )
    assert (saved / "model.safetensors").is_file()


def test_push_to_hub_without_a_token_stops_before_the_study(model, tmp_path, monkeypatch, online_hub, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["--model", str(model), *FAST, "--output", str(tmp_path / "o"), "--push-to-hub", "me/x"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: --push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("params", "cell"),
    [
        ({"direction_scope": "global", "direction_index": 7.25}, "layer 7.25"),
        # A per-layer trial still draws an index (see space.py): the table must not show it.
        ({"direction_scope": "per-layer", "direction_index": 7.25}, "per layer"),
        ({"direction_index": 3.5}, "layer 3.50"),  # --direction-scope global: no scope parameter
        ({}, "per layer"),  # --direction-scope per-layer
        (
            {"direction_scope": "global", "direction_index": 2.0, "direction_projection": 0.375},
            "layer 2.00, projected 0.38",
        ),
        ({"direction_scope": "per-layer", "direction_projection": 0.0}, "per layer, mean difference"),
        ({"direction_index": 4.0, "direction_projection": 1.0}, "layer 4.00, projected"),
    ],
)
def test_the_front_table_says_where_each_direction_comes_from(params, cell):
    assert direction_cell(params) == cell


def test_time_left_comes_from_the_studys_mean_trial_time():
    from datetime import datetime, timedelta

    from rich.progress import Progress

    from abliterate.terminal import StudyTimeRemaining, mean_trial_seconds

    trials = [optuna.trial.create_trial(values=[1, 0.1], params={}, distributions={}) for _ in range(2)]
    for trial, seconds in zip(trials, (30, 50), strict=True):
        trial.datetime_start = datetime(2026, 12, 1, 12, 0)
        trial.datetime_complete = trial.datetime_start + timedelta(seconds=seconds)
    assert mean_trial_seconds(trials) == 40.0
    assert mean_trial_seconds([]) is None
    progress = Progress()
    study = progress.add_task("study", total=10, completed=4, seconds_per_trial=40.0)
    assert StudyTimeRemaining().render(progress.tasks[study]).plain == "0:04:00"  # 6 trials x 40 s
    fresh = progress.add_task("study", total=10, seconds_per_trial=None)  # no trial yet: rich's own estimate
    assert StudyTimeRemaining().render(progress.tasks[fresh]).plain == "-:--:--"


def test_with_workers_the_time_per_trial_is_the_whole_studys():
    from datetime import datetime, timedelta

    from abliterate.terminal import seconds_per_finished_trial

    since = datetime(2026, 12, 1, 12, 0)
    earlier = optuna.trial.create_trial(values=[1, 0.1], params={}, distributions={})
    earlier.datetime_start, earlier.datetime_complete = (
        since - timedelta(seconds=90),
        since - timedelta(seconds=50),
    )
    assert seconds_per_finished_trial([earlier], since, now=since) == 40.0  # none since: its mean time
    # Four workers, each trial 40 s long: four trials finished in the 40 s since.
    recent = []
    for _ in range(4):
        trial = optuna.trial.create_trial(values=[1, 0.1], params={}, distributions={})
        trial.datetime_start, trial.datetime_complete = since, since + timedelta(seconds=40)
        recent.append(trial)
    assert seconds_per_finished_trial([earlier, *recent], since, now=since + timedelta(seconds=40)) == 10.0


def test_a_study_kept_in_sqlite_by_an_earlier_release_grows_there(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "o"
    sqlite = f"sqlite:///{(output / 'study.db').resolve()}"
    argv = ["--model", str(model), *FAST[:-2], "--select", "none", "--output", str(output)]
    assert main([*argv, "--n-trials", "2", "--storage", sqlite]) == 0
    # Run again without --storage, as a user of the earlier release's default would.
    assert main([*argv, "--n-trials", "3"]) == 0
    assert "the study is kept in sqlite:///" in capsys.readouterr().err
    assert not (output / "study.journal").exists()
    assert len(optuna.load_study(study_name="tiny", storage=sqlite).trials) == 3


def test_a_failed_run_keeps_a_storage_file_placed_in_its_new_output_folder(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "new"
    journal = output / "mine.journal"

    def export_fails(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "export", export_fails)
    argv = ["--model", str(model), *FAST, "--select", "min-kl", "--output", str(output), "--storage", f"journal:{journal}"]  # fmt: skip
    with pytest.raises(RuntimeError, match="disk full"):
        main(argv)
    assert journal.is_file()  # its trials are kept, and the same command resumes them
    assert optuna.get_all_study_summaries(open_storage(f"journal:{journal}"))[0].n_trials == 2


def test_with_workers_the_parent_only_chooses_and_picking_a_trial_starts_none(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--output", str(tmp_path / "o"), "--workers", "2"]
    launched, searched = [], []
    monkeypatch.setattr(pipeline.workers, "launch", lambda *args, **kwargs: launched.append(args))
    monkeypatch.setattr(pipeline, "search", lambda *args: searched.append(args))
    # The workers ran the search (and spent any --time-budget): the parent runs no trial of its own.
    assert main([*argv, "--select", "none"]) == 0
    assert len(launched) == 1 and searched == []
    monkeypatch.undo()
    assert main(["--model", str(model), *FAST, "--output", str(tmp_path / "o"), "--select", "none"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.workers, "launch", lambda *args, **kwargs: launched.append(args))
    # A stored trial is saved as it is: no workers, no new trials.
    assert main([*argv, "--select", "trial:0"]) == 0
    assert len(launched) == 1 and (tmp_path / "o" / "model").is_dir()


def test_a_chosen_trial_whose_refusals_were_skipped_is_counted_for_its_card(model, tmp_path, monkeypatch):
    import copy

    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(model), *FAST, "--output", str(tmp_path / "o")]
    assert main([*argv, "--select", "none"]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    counted = study.trials[0]

    def as_skipped(study, selection):  # the chosen trial, as --skip-dominated would have stored it
        trial = copy.deepcopy(counted)
        trial.values = [999, counted.values[1]]
        trial.set_user_attr("refusals_counted", False)
        return trial

    monkeypatch.setattr(pipeline, "select_trial", as_skipped)
    assert main([*argv, "--select", "trial:0"]) == 0
    card = json.loads((tmp_path / "o" / "model" / "abliterate.json").read_text())
    assert card["refusals"] == counted.values[0]  # counted again, not the stand-in


def test_an_output_folder_of_another_models_study_is_refused_before_loading(
    model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "o"
    assert main(["--model", str(model), *FAST, "--select", "none", "--output", str(output)]) == 0
    before = sorted(path.name for path in output.iterdir())
    capsys.readouterr()
    assert main([*FAST, "--select", "none", "--output", str(output)]) == 1  # the built-in demo model
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"abliterate: error: --output {output} holds the study 'tiny' of another model; choose another "
        "--output (or pass --study-name to keep a second study in it)"
    ]
    assert sorted(path.name for path in output.iterdir()) == before


def test_picking_a_trial_of_a_study_not_begun_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "load_for_scoring", lambda *args: pytest.fail("the model was loaded"))
    assert main(["--select", "trial:0", "--output", str(tmp_path / "new")]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("abliterate: error: --select trial:0: there is no study 'abliterate-demo' in journal:")
    )
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_before_its_first_trial_leaves_an_empty_output_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "empty"
    output.mkdir()
    assert main(["--select", "trial:0", "--output", str(output)]) == 1
    assert "there is no study" in capsys.readouterr().err
    assert output.is_dir() and not any(output.iterdir())  # not even the marker a run leaves


def test_a_failed_run_keeps_a_study_another_run_began_in_the_same_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "shared"
    output.mkdir()

    def another_run_begins_then_this_one_fails(settings, output, storage_url, study_name):
        optuna.create_study(study_name="other", storage=open_storage(storage_url))
        raise UserError("this run's own mistake")

    monkeypatch.setattr(pipeline, "check_before_loading", another_run_begins_then_this_one_fails)
    assert main(["--output", str(output)]) == 1
    assert folder_holds_study(output)


def test_a_model_with_layers_offloaded_to_disk_is_refused_before_its_study(
    model, tmp_path, monkeypatch, capsys
):
    """accelerate keeps offloaded layers on the meta device: edits written there would reach nothing."""
    monkeypatch.chdir(tmp_path)
    loaded = load_chat_model(str(model), dtypes=["float32"], device_map="cpu")
    layers = loaded.model.config.num_hidden_layers
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.layers.{i}": "disk" if i == layers - 1 else "cpu" for i in range(layers)}
    loaded.model = transformers.AutoModelForCausalLM.from_pretrained(
        model, device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    monkeypatch.setattr(pipeline, "load_for_scoring", lambda *args: loaded)
    assert main(["--model", str(model), *FAST, "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"abliterate: error: 2 of tiny's editable matrices (model.layers.{layers - 1}.self_attn.o_proj.weight, ...) "
        "are offloaded to the CPU or disk by --device-map auto, where edits cannot reach them; make the model fit "
        "its devices (--quantization bnb-4bit, more GPUs) or run it all on the CPU (--device-map cpu)"
    )
    assert not (tmp_path / "o").exists()
