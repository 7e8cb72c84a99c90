"""Every user mistake ends as one exact line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from abliterate.cli import main

# Small prompt splits keep each case to a second or so.
FAST = [
    "--harmful-train-split", "train[:8]", "--harmless-train-split", "train[:8]",
    "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]",
    "--max-response-length", "4", "--n-startup-trials", "1",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    message: str  # the exact line; {model}, {tmp} are filled in
    exit_code: int = 1
    setup: str | None = None  # a function below that prepares files in tmp


def write_empty_prompts(tmp: Path) -> None:
    (tmp / "empty.txt").write_text("\n  \n")


def write_latin1_prompts(tmp: Path) -> None:
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait recipe\n".encode("latin-1"))


def write_csv_prompts(tmp: Path) -> None:
    (tmp / "prompts.csv").write_text("question,label\nhow do I bake bread,0\n")


def write_bad_jsonl(tmp: Path) -> None:
    (tmp / "prompts.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')


def write_unknown_key_config(tmp: Path) -> None:
    (tmp / "config.toml").write_text("n_trials = 3\nn_trails = 5\n")


def write_not_ours_output(tmp: Path) -> None:
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "notes.txt").write_text("someone else's")


def write_remote_code_model(tmp: Path) -> None:
    (tmp / "custom").mkdir()
    config = {
        "model_type": "strange_thing",
        "auto_map": {"AutoConfig": "configuration_strange.StrangeConfig"},
    }
    (tmp / "custom" / "config.json").write_text(json.dumps(config))


def write_not_a_model(tmp: Path) -> None:
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "weights.bin").write_bytes(b"\0")


def write_weightless_model(tmp: Path) -> None:
    folder = tmp / "weightless"
    tiny_model("llama").config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def write_earlier_result(tmp: Path) -> None:
    """An output folder whose saved model is now the source: abliterating a result again."""
    folder = tmp / "earlier" / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp / "earlier" / ".abliterate").write_text("")


def write_a_file(tmp: Path) -> None:
    (tmp / "afile.txt").write_text("not a folder")
    (tmp / "prompts").mkdir()


def write_untemplated_model(tmp: Path) -> None:
    folder = tmp / "no-template"
    tiny_model("llama").save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_layerless_model(tmp: Path) -> None:
    import transformers

    folder = tmp / "bert"
    config = transformers.BertConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    transformers.BertLMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


CASES = [
    Case("missing model folder", ["--model", "./no/such/model"], "model folder ./no/such/model does not exist"),
    Case("folder that is not a model", ["--model", "{tmp}/not-a-model"],
         "{tmp}/not-a-model is not a model folder: it has no config.json", setup="write_not_a_model"),
    Case("hub id while offline", ["--model", "someorg/some-model"],
         "model 'someorg/some-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
         "download it first or pass a local folder"),
    Case("remote code without the flag", ["--model", "{tmp}/custom"],
         "model '{tmp}/custom' runs its own code; pass --trust-remote-code true if you trust its authors",
         setup="write_remote_code_model"),
    Case("tokenizer without chat template", ["--model", "{tmp}/no-template"],
         "the tokenizer of '{tmp}/no-template' has no chat template; pass one with --chat-template FILE (Jinja)",
         setup="write_untemplated_model"),
    Case("missing chat template file", ["--model", "{model}", "--chat-template", "{tmp}/nope.jinja"],
         "chat template file {tmp}/nope.jinja does not exist"),
    Case("model without decoder layers", ["--model", "{tmp}/bert", *FAST],
         "cannot find the decoder layers of BertLMHeadModel: no `layers` list in the model", setup="write_layerless_model"),
    Case("empty prompt file", ["--model", "{model}", "--harmful-train", "{tmp}/empty.txt"],
         "--harmful-train: no prompts in {tmp}/empty.txt (split 'train')", setup="write_empty_prompts"),
    Case("prompt file in a bad encoding", ["--model", "{model}", "--harmless-train", "{tmp}/latin1.txt"],
         "--harmless-train: {tmp}/latin1.txt is not valid UTF-8; convert it (for example with iconv -t utf-8)",
         setup="write_latin1_prompts"),
    Case("missing prompt file", ["--model", "{model}", "--harmful-eval", "{tmp}/missing.txt"],
         "--harmful-eval: prompt file {tmp}/missing.txt does not exist"),
    Case("column that does not exist", ["--model", "{model}", "--harmless-eval", "{tmp}/prompts.csv"],
         "--harmless-eval: {tmp}/prompts.csv has no column 'text' (columns: question, label)", setup="write_csv_prompts"),
    Case("broken jsonl line", ["--model", "{model}", "--harmful-train", "{tmp}/prompts.jsonl"],
         "--harmful-train: {tmp}/prompts.jsonl line 2 is not valid JSON (Expecting value)", setup="write_bad_jsonl"),
    Case("split out of range", ["--model", "{model}", "--harmful-eval-split", "eval[:5000]"],
         "--harmful-eval: slice [:5000] is out of range: it has 100 prompts"),
    Case("unknown split of a built-in set", ["--model", "{model}", "--harmful-eval-split", "test"],
         "--harmful-eval: the built-in sets have the splits train and eval, not 'test'"),
    Case("unknown built-in set", ["--model", "{model}", "--harmful-train", "builtin:nasty"],
         "--harmful-train: unknown built-in set 'nasty'; choose builtin:harmful or builtin:harmless"),
    Case("zero trials", ["--n-trials", "0"], "--n-trials: Input should be greater than 0 (got '0')", 2),
    Case("negative trials", ["--n-trials", "-3"], "--n-trials: Input should be greater than 0 (got '-3')", 2),
    Case("trials not a number", ["--n-trials", "many"],
         "--n-trials: Input should be a valid integer, unable to parse string as an integer (got 'many')", 2),
    Case("unknown reset", ["--reset", "magic"],
         "--reset: Input should be 'auto', 'gpu-cache', 'host-cache', 'disk', 'reload' or 'adapter' (got 'magic')", 2),
    Case("bad boolean", ["--cache-weights", "maybe"],
         "--cache-weights: Input should be a valid boolean, unable to interpret input (got 'maybe')", 2),
    Case("unknown dtype", ["--dtypes", "float32,int3"],
         "--dtypes: unknown dtype 'int3'; choose from auto, bfloat16, float16, float32 (got 'float32,int3')", 2),
    Case("malformed select", ["--select", "best"], "--select: use knee, min-refusals, min-kl, max-kl:X, trial:N or none (got 'best')", 2),
    Case("KL limit that is not a number", ["--select", "max-kl:low"],
         "--select: use knee, min-refusals, min-kl, max-kl:X, trial:N or none (got 'max-kl:low')", 2),
    Case("unknown key in config.toml", ["--config", "{tmp}/config.toml"],
         "unknown setting 'n_trails' in {tmp}/config.toml (did you mean 'n_trials'?); see `abliterate --help` for the valid names", 2,
         setup="write_unknown_key_config"),
    Case("missing config file", ["--config", "{tmp}/absent.toml"], "config file {tmp}/absent.toml does not exist", 2),
    Case("cache conflict", ["--model", "{model}", *FAST, "--reset", "host-cache", "--cache-weights", "false", "--output", "{tmp}/out"],
         "--reset host-cache keeps a cache, but --cache-weights is false; drop one of the two", 2),
    Case("storage that cannot be opened", ["--model", "{model}", *FAST, "--storage", "nosuchdb://x/y", "--output", "{tmp}/out"],
         "cannot open storage 'nosuchdb://x/y': Can't load plugin: sqlalchemy.dialects:nosuchdb"),
    Case("output folder that is not ours", ["--model", "{model}", *FAST, "--output", "{tmp}/theirs"],
         "--output {tmp}/theirs exists and was not made by abliterate; choose another --output or empty it",
         setup="write_not_ours_output"),
    Case("output inside the source model", ["--model", "{model}", *FAST, "--output", "{model}/abliterated"],
         "--output {model}/abliterated is inside the source model folder {model}; choose a folder outside it"),
    Case("output that holds the source model", ["--model", "{tmp}/earlier/model", *FAST, "--output", "{tmp}/earlier"],
         "the source model {tmp}/earlier/model is inside --output {tmp}/earlier; choose an --output outside it",
         setup="write_earlier_result"),
    Case("workers with the output inside the source model", ["--model", "{model}", "--workers", "2", "--output", "{model}/out"],
         "--output {model}/out is inside the source model folder {model}; choose a folder outside it"),
    Case("model folder without weights", ["--model", "{tmp}/weightless", *FAST],
         "cannot load the weights of {tmp}/weightless: Error no file named model.safetensors, or pytorch_model.bin, found in directory {tmp}/weightless.", setup="write_weightless_model"),
    Case("compile without a GPU", ["--model", "{model}", *FAST, "--compile", "--output", "{tmp}/out"],
         "--compile needs the whole model on one CUDA GPU, but it is on cpu; drop --compile"),
    Case("output below a file", ["--model", "{model}", *FAST, "--output", "{tmp}/afile.txt/sub"],
         "cannot create --output {tmp}/afile.txt/sub: Not a directory; choose another --output", setup="write_a_file"),
    Case("prompt set that is a folder", ["--model", "{model}", "--harmful-train", "{tmp}/prompts"],
         "--harmful-train: {tmp}/prompts is a folder; give a prompt file (.txt, .jsonl, .csv or .parquet)",
         setup="write_a_file"),
    Case("negative seed", ["--seed", "-5"], "--seed: Input should be greater than or equal to 0 (got '-5')", 2),
    Case("misspelt flag", ["--n-trails", "5"], "unrecognized arguments: --n-trails 5; see `abliterate --help`", 2),
    Case("gpus without workers", ["--gpus", "0,1"],
         "--gpus picks the GPUs of --workers N (N > 1); for one run use --device-map cuda:K", 2),
    Case("full row norm through the adapter", ["--reset", "adapter", "--row-norm", "full"],
         "--row-norm full changes every row's scale and cannot be expressed as an adapter (--reset adapter); "
         "use none or pre", 2),
    Case("full row norm of 4-bit weights", ["--quantization", "bnb-4bit", "--row-norm", "full"],
         "--row-norm full changes every row's scale and cannot be expressed as an adapter (4-bit weights are "
         "edited through one); use none or pre", 2),
    Case("4-bit weights reset from disk", ["--quantization", "bnb-4bit", "--reset", "disk"],
         "--reset disk cannot restore 4-bit weights; use --reset adapter (or auto)", 2),
    Case("more gpus than workers", ["--workers", "2", "--gpus", "0,1,2"],
         "--gpus lists 3 GPUs for --workers 2, one GPU each; list 2, or pass --workers 3", 2),
    Case("upload with nothing saved", ["--push-to-hub", "me/x", "--select", "none"],
         "--push-to-hub uploads the saved model, but --select none saves none; pick a trial", 2),
    Case("upload to a malformed repo id", ["--model", "{model}", "--push-to-hub", "me/tiny/extra"],
         "--push-to-hub 'me/tiny/extra' is not a Hugging Face repo id; use user/name"),
    Case("upload while offline", ["--model", "{model}", "--push-to-hub", "me/tiny-abliterated"],
         "--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push-to-hub"),
    Case("select a trial that does not exist",
         ["--model", "{model}", *FAST, "--n-trials", "1", "--select", "trial:99", "--output", "{tmp}/out"],
         "--select trial:99: there is no study 'tiny' in journal:{tmp}/out/study.journal yet; run it first"),
]  # fmt: skip


@pytest.fixture
def shared_model(tiny_model_folder: Path) -> Path:
    return tiny_model_folder


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, shared_model: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case.setup:
        globals()[case.setup](tmp_path)

    def fill(text: str) -> str:
        return text.replace("{model}", str(shared_model)).replace("{tmp}", str(tmp_path))

    outputs = [tmp_path / "out", tmp_path / "abliterated"]
    existed = [path.exists() for path in outputs]
    code = main([fill(arg) for arg in case.argv])
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "abliterate: error: " + fill(case.message)
    assert code == case.exit_code
    assert not any("Traceback" in line for line in error)
    # A run that fails before its first trial leaves no output folder of its own behind.
    assert [path.exists() for path in outputs] == existed


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "abliterate", "--model", str(tmp_path / "absent")]
    plain = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 1
    assert (
        plain.stderr.strip().splitlines()[-1]
        == f"abliterate: error: model folder {tmp_path / 'absent'} does not exist"
    )
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_the_source_model_is_never_written(shared_model: Path, tmp_path: Path, monkeypatch):
    before = {path: path.stat().st_mtime_ns for path in shared_model.rglob("*")}
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "--model",
                str(shared_model),
                *FAST,
                "--n-trials",
                "2",
                "--select",
                "knee",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert {path: path.stat().st_mtime_ns for path in shared_model.rglob("*")} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
def test_a_cuda_device_map_without_a_gpu_is_one_line(shared_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(shared_model), "--device-map", "cuda:1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: --device-map cuda:1, but no CUDA GPU is visible; use --device-map auto or cpu"
    )


def test_a_hub_id_when_the_hub_does_not_answer_says_so(monkeypatch, capsys, tmp_path):
    import transformers

    def unreachable(*args, **kwargs):  # transformers' words when huggingface.co does not answer
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them"
        )

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    assert main(["--model", "someorg/some-model"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "abliterate: error: cannot load model 'someorg/some-model': no local folder of that name, and the "
        "Hugging Face Hub cannot be reached; check the path, or download the model where there is a network"
    )
