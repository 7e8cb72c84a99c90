"""Prompt sets: the built-in ones, local files and Hugging Face datasets.

Every source yields a list of non-empty strings. A split is a name plus an optional slice in the
`datasets` syntax (`train`, `eval[:50]`, `train[100:300]`); slices are applied here, the same way
for every source, and a slice that reaches past the end is an error rather than silently short.

Blank lines of a text file are skipped, but a null or blank cell of a table (jsonl, csv, parquet,
dataset) that the split selects is an error: it means broken data, which users should notice
rather than get the prompt "None" or rows silently dropped.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from abliterate.errors import UserError
from abliterate.settings import PromptSet

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = ("harmful", "harmless")
BUILTIN_SPLITS = ("train", "eval")
FILE_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")

# A bound is empty or an integer: `-?\d*` would let a lone minus through to int() (`train[-:5]`).
_SPLIT = re.compile(r"^(?P<name>[A-Za-z0-9_.-]*)(?:\[(?P<start>(?:-?\d+)?):(?P<stop>(?:-?\d+)?)\])?$")


@dataclass(frozen=True)
class _Missing:
    """A null or blank table cell. It stands in the rows until the split is applied, so that only
    a broken cell the split selects is an error, and row numbers are those of the source."""

    place: str  # for example "prompts.jsonl line 7"
    column: str


_Row = str | _Missing


@dataclass(frozen=True)
class Split:
    name: str
    start: int | None
    stop: int | None

    @classmethod
    def parse(cls, text: str) -> Split:
        match = _SPLIT.match(text.strip())
        if match is None:
            raise UserError(
                f"bad split {text!r}: use a name with an optional slice, like train or train[:200]"
            )
        start, stop = match["start"], match["stop"]
        return cls(match["name"], int(start) if start else None, int(stop) if stop else None)

    def apply(self, rows: list[_Row], what: str) -> list[_Row]:
        for bound in (self.start, self.stop):
            if bound is not None and abs(bound) > len(rows):
                raise UserError(
                    f"{what}: slice [{self.start or ''}:{self.stop or ''}] is out of range: it has {len(rows)} prompts"
                )
        return rows[self.start : self.stop]


def load_prompts(spec: PromptSet, what: str) -> list[str]:
    """Load one prompt set; `what` names it in errors (for example `--harmful-train`)."""
    split = Split.parse(spec.split)
    if spec.source.startswith(BUILTIN_PREFIX):
        rows = _load_builtin(spec.source[len(BUILTIN_PREFIX) :], split.name, what)
    elif Path(spec.source).suffix.lower() in FILE_SUFFIXES or Path(spec.source).exists():
        rows = _load_file(Path(spec.source), spec.column, what)
    else:
        rows = _load_dataset(spec.source, split.name, spec.column, what)
    rows = split.apply(rows, what)
    missing = next((row for row in rows if isinstance(row, _Missing)), None)
    if missing is not None:
        raise UserError(
            f"{what}: {missing.place} has no text in column {missing.column!r}; fill it in, remove the row "
            "or choose a split that leaves it out"
        )
    if not rows:
        raise UserError(f"{what}: no prompts in {spec.source} (split {spec.split!r})")
    return rows


def builtin_prompts(name: str, split: str) -> list[str]:
    return _load_builtin(name, split, f"builtin:{name}")


def _load_builtin(name: str, split: str, what: str) -> list[str]:
    if name not in BUILTIN_SETS:
        raise UserError(f"{what}: unknown built-in set {name!r}; choose builtin:harmful or builtin:harmless")
    split = split or "train"
    if split not in BUILTIN_SPLITS:
        raise UserError(f"{what}: the built-in sets have the splits train and eval, not {split!r}")
    text = resources.files("abliterate.data").joinpath(f"prompts/{name}_{split}.txt").read_text("utf-8")
    return _non_empty(text.splitlines())


def _load_file(path: Path, column: str, what: str) -> list[_Row]:
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder; give a prompt file (.txt, .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise UserError(f"{what}: prompt file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _parquet_column(path, column, what)
        text = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{what}: {path} is not valid UTF-8; convert it (for example with iconv -t utf-8)"
        ) from None
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{what}: {path} line {number} is not valid JSON ({error.msg})") from None
            rows.append(_column(record, column, f"{path} line {number}", what))
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            raise UserError(
                f"{what}: {path} has no column {column!r} (columns: {', '.join(reader.fieldnames or [])})"
            )
        # DictReader skips blank lines; `line_num` is the line a row ends on, as an editor counts.
        return [_cell_text(row[column], column, f"{path} line {reader.line_num}") for row in reader]
    return _non_empty(text.splitlines())


def _column(record: object, column: str, place: str, what: str) -> _Row:
    if not isinstance(record, dict) or column not in record:
        columns = f" (columns: {', '.join(record)})" if isinstance(record, dict) else ""
        raise UserError(
            f"{what}: {place} has no column {column!r}{columns}; choose it with --{what.lstrip('-')}-column"
        )
    return _cell_text(record[column], column, place)


def _cell_text(value: object, column: str, place: str) -> _Row:
    """The prompt in one cell, stripped; a null or blank cell is kept as `_Missing`, not skipped,
    so that broken data is noticed."""
    text = "" if value is None else str(value).strip()
    return text or _Missing(place, column)


def _parquet_column(path: Path, column: str, what: str) -> list[_Row]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UserError(f"{what}: reading {path} needs pyarrow: pip install pyarrow") from None
    table = parquet.read_table(path)
    if column not in table.column_names:
        raise UserError(f"{what}: {path} has no column {column!r} (columns: {', '.join(table.column_names)})")
    return [
        _cell_text(value, column, f"{path} row {index} (counting from 0)")
        for index, value in enumerate(table.column(column).to_pylist())
    ]


def _load_dataset(dataset_id: str, split: str, column: str, what: str) -> list[_Row]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{what}: {dataset_id!r} is neither a built-in set nor a local file; loading it as a Hugging Face "
            "dataset needs the datasets package: pip install datasets (or the datasets extra)"
        ) from None
    try:
        data = datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as error:  # datasets raises many types; all mean the same to the user
        raise UserError(f"{what}: cannot load dataset {dataset_id!r} split {split!r}: {error}") from None
    if column not in data.column_names:
        raise UserError(
            f"{what}: dataset {dataset_id!r} has no column {column!r} (columns: {', '.join(data.column_names)})"
        )
    return [
        _cell_text(value, column, f"dataset {dataset_id!r} row {index} (counting from 0)")
        for index, value in enumerate(data[column])
    ]


def _non_empty(rows) -> list[str]:
    return [row.strip() for row in rows if row and row.strip()]
