"""Saving the chosen result: the output folder, atomic writes, the model card, the upload.

The output folder holds the study's SQLite file (by default) and the saved model in `model/`. A
marker file says the folder is ours, so that an existing folder of someone else's is never
written into. The model is written to a temporary folder beside its final place and renamed in
one step: after a crash the folder is either complete or absent. An upload to the Hugging Face
Hub sends that saved folder; its preconditions are checked before the study starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from abliterate.ablation import ablate_
from abliterate.checkpoint import checkpoint_part, key_files, locate, safetensors_files
from abliterate.components import EditableModel, Matrix, find_components
from abliterate.errors import UserError
from abliterate.model import DEMO_MODEL_NAME, demo_model_path, hub_offline
from abliterate.reset import Edit, apply_edit

MARKER = ".abliterate"
MODEL_FOLDER = "model"


def saved_metadata(folder: Path) -> dict:
    """A saved result's abliterate.json (source model, trial, parameters, scores); {} for another folder."""
    try:
        metadata = json.loads((folder / "abliterate.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def source_of_saved_model(folder: Path) -> str | None:
    """The model a saved result was made from; None for any other folder."""
    source = saved_metadata(folder).get("source_model")
    return str(demo_model_path()) if source == DEMO_MODEL_NAME else source


def saved_trial_number(folder: Path) -> int | None:
    """The trial a saved result holds; None when the folder holds none."""
    trial = saved_metadata(folder).get("trial")
    return trial if isinstance(trial, int) else None


def prepare_output(output: Path, source_folder: Path | None) -> None:
    """Create the output folder, or accept it if it is ours; the source model and it never overlap."""
    output = output.resolve()
    if source_folder is not None:
        source = source_folder.resolve()
        if output == source or source in output.parents:
            raise UserError(
                f"--output {output} is inside the source model folder {source}; choose a folder outside it"
            )
        if output in source.parents:  # re-abliterating a saved result: its save would replace the source
            raise UserError(
                f"the source model {source} is inside --output {output}; choose an --output outside it"
            )
    if output.exists():
        if not output.is_dir():
            raise UserError(f"--output {output} exists and is not a folder; choose another --output")
        if any(output.iterdir()) and not (output / MARKER).is_file():
            raise UserError(
                f"--output {output} exists and was not made by abliterate; choose another --output or empty it"
            )
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / MARKER).write_text("This folder was made by abliterate: a study and its saved model.\n")
    except OSError as error:  # a file where a folder should be, no permission, a read-only disk
        raise UserError(
            f"cannot create --output {output}: {error.strerror or error}; choose another --output"
        ) from None


@dataclass(frozen=True)
class ModelCard:
    source_model: str
    trial: int
    params: dict
    refusals: int
    eval_prompts: int
    baseline_refusals: int | None
    kl: float
    command: str
    hub_id: str | None = None  # the source's Hub id; local models have none
    refusal_judge: str = "markers"  # what counted the refusals (--refusal-judge)
    kl_tokens: int = 1  # the KL's response tokens (--kl-tokens)

    def markdown(self) -> str:
        params = "\n".join(
            f"| `{name}` | {value:.4g} |" if isinstance(value, float) else f"| `{name}` | {value} |"
            for name, value in sorted(self.params.items())
        )
        before = (
            f"{self.baseline_refusals}/{self.eval_prompts}"
            if self.baseline_refusals is not None
            else "not measured"
        )
        kl_of = "first token" if self.kl_tokens == 1 else f"first {self.kl_tokens} tokens"
        # The Hub checks `base_model` against its repos: only a Hub id belongs there.
        base_model = f"base_model: {self.hub_id}\n" if self.hub_id else ""
        source = (
            f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
            if self.hub_id
            else f"`{self.source_model}`"
        )
        return f"""---
{base_model}tags:
- abliterate
- abliterated
---
# Abliterated {self.source_model}

This model is {source} with its refusal direction ablated by
`abliterate` (directional ablation, Arditi et al. 2024), parameters chosen by an Optuna study
(trial {self.trial}).

| | original | this model |
|---|---|---|
| refusals on harmful eval prompts (judged by {self.refusal_judge}) | {before} | {self.refusals}/{self.eval_prompts} |
| KL divergence from the original (harmless eval prompts, {kl_of}) | 0 | {self.kl:.4f} |

## Parameters

| parameter | value |
|---|---|
{params}

## Command

```
{self.command}
```
"""


def save_model(model, tokenizer, output: Path, card: ModelCard) -> Path:
    """Write model, tokenizer, card and metadata to `output/model`, atomically replacing any earlier one."""
    return _save(
        lambda folder: model.save_pretrained(folder, safe_serialization=True), tokenizer, output, card
    )


def save_edited_checkpoint(
    source: Path,
    editable: EditableModel,
    edits: list[Edit],
    row_norm: str,
    tokenizer,
    output: Path,
    card: ModelCard,
    trust_remote_code: bool = False,
) -> Path:
    """Save the source checkpoint with `edits` merged in: shard by shard for safetensors (see
    `save_merged`); an older checkpoint (pytorch_model.bin) is loaded whole on the CPU and edited."""
    if safetensors_files(source):
        return save_merged(source, editable, edits, row_norm, tokenizer, output, card)
    full = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype="auto", device_map="cpu", trust_remote_code=trust_remote_code
    )
    full_editable = find_components(full)
    for edit in edits:
        apply_edit(full_editable, edit, row_norm)
    return save_model(full, tokenizer, output, card)


def save_merged(
    source: Path,
    editable: EditableModel,
    edits: list[Edit],
    row_norm: str,
    tokenizer,
    output: Path,
    card: ModelCard,
) -> Path:
    """Like `save_model`, for a model whose weights were never edited (the adapter, 4-bit weights):
    the source's safetensors files with the edits merged in, one file at a time, so that saving
    never holds more than one shard in host memory."""
    return _save(
        lambda folder: merge_checkpoint(source, folder, editable, edits, row_norm), tokenizer, output, card
    )


# Beside the weights, what `save_pretrained` would write; plus code shipped with the model.
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def merge_checkpoint(
    source: Path, target: Path, editable: EditableModel, edits: list[Edit], row_norm: str
) -> None:
    """Write the checkpoint in `source` to `target` with `edits` applied, shard by shard, same file names."""
    files = key_files(source)
    to_edit: dict[Path, list[tuple[str, Matrix, int, Edit]]] = {}
    for edit in edits:
        for matrix in editable.components[edit.layer].get(edit.component, []):
            parts = locate(matrix, files)
            for file, key in parts:
                to_edit.setdefault(file, []).append((key, matrix, len(parts), edit))
    # The files the checkpoint names: repos may ship other safetensors files (consolidated.safetensors).
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        for key, matrix, parts, edit in to_edit.get(file, []):
            ablate_(checkpoint_part(matrix, parts, tensors[key]), edit.direction, edit.weight, row_norm)
        save_file(tensors, str(target / file.name), metadata=metadata)
        del tensors  # before the next shard loads: one shard in memory at a time
    for path in source.iterdir():
        if path.is_file() and (path.name in _CHECKPOINT_FILES or path.suffix == ".py"):
            shutil.copy2(path, target / path.name)


def _save(write_weights: Callable[[Path], None], tokenizer, output: Path, card: ModelCard) -> Path:
    final = output / MODEL_FOLDER
    partial = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER}.partial-", dir=output))
    retired: Path | None = None
    try:
        write_weights(partial)
        tokenizer.save_pretrained(partial)
        (partial / "README.md").write_text(card.markdown(), "utf-8")
        metadata = {
            "source_model": card.source_model,
            "trial": card.trial,
            "params": card.params,
            "refusals": card.refusals,
            "kl": card.kl,
            "refusal_judge": card.refusal_judge,
            "kl_tokens": card.kl_tokens,
        }
        (partial / "abliterate.json").write_text(json.dumps(metadata, indent=2), "utf-8")
        _fsync_tree(partial)
        _permissions_from_umask(partial)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER}.old-", dir=output))
            os.replace(final, retired / MODEL_FOLDER)
            os.replace(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(partial, final)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if retired is not None:
            with contextlib.suppress(OSError):  # empty unless the saved model went in: then it stays
                retired.rmdir()
        # safetensors reports a full disk as its own error, not as an OSError.
        if isinstance(error, (OSError, SafetensorError)):  # a full disk, a read-only folder
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise UserError(
                f"cannot save the model in {output}: {reason}; the study is kept: "
                "rerun the same command to save again"
            ) from None
        raise
    return final


def clean_partials(output: Path) -> None:
    """Remove what an interrupted save left behind; a saved model it had just set aside goes back."""
    final = output / MODEL_FOLDER
    for retired in output.glob(f".{MODEL_FOLDER}.old-*"):
        if not final.exists() and (retired / MODEL_FOLDER).is_dir():
            os.replace(retired / MODEL_FOLDER, final)
    for leftover in output.glob(f".{MODEL_FOLDER}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# The model card's section that `abliterate evaluate --tasks` writes, between these two lines.
TASKS_SECTION = ("<!-- abliterate evaluate --tasks -->", "<!-- end of abliterate evaluate --tasks -->")


def write_card_section(folder: Path, section: str) -> bool:
    """Put `section` (Markdown) into the model card of a model abliterate saved, in place of the one an
    earlier evaluation wrote; False (nothing written) for any other folder."""
    card = folder / "README.md"
    if not saved_metadata(folder) or not card.is_file():
        return False
    begin, end = TASKS_SECTION
    text = card.read_text("utf-8")
    block = f"{begin}\n{section.strip()}\n{end}\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_file_atomically(card, text.encode("utf-8"))
    return True


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or none: a temporary file beside it, renamed over it, readable as any new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False
    ) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)  # NamedTemporaryFile makes a private file
    os.replace(handle.name, path)


def _permissions_from_umask(folder: Path) -> None:
    """mkdtemp makes a private folder; the saved model should be as readable as any other new file."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def check_upload(repo_id: str) -> None:
    """What an upload needs and a study cannot fix: a valid repo id, the network allowed, a token."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hugging Face repo id; use user/name") from None
    if hub_offline():
        raise UserError(
            "--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push-to-hub"
        )
    if get_token() is None:
        raise UserError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def upload(folder: Path, repo_id: str, private: bool) -> str:
    """Upload a saved model folder to a Hub repo, creating the repo if missing; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="Upload a model abliterated by abliterate"
        )
    # HTTP, network and permission errors come in many types: all mean "not uploaded".
    except Exception as error:
        raise UserError(
            f"cannot upload to {repo_id}: {str(error).splitlines()[0]}; the model is saved in {folder}, "
            "and the same command uploads it again"
        ) from None
    return str(url)
