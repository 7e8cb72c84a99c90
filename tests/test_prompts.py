"""Prompt sets from every kind of source."""

import json
from pathlib import Path

import pytest

from abliterate.errors import UserError
from abliterate.prompts import Split, builtin_prompts, load_prompts
from abliterate.settings import PromptSet


def test_builtin_sets_are_large_distinct_and_disjoint():
    sets = {
        (name, split): builtin_prompts(name, split)
        for name in ("harmful", "harmless")
        for split in ("train", "eval")
    }
    for (name, split), prompts in sets.items():
        assert len(prompts) >= (400 if split == "train" else 100), (name, split)
        assert len({p.lower() for p in prompts}) == len(prompts)
    everything = [p.lower() for prompts in sets.values() for p in prompts]
    assert len(set(everything)) == len(everything)


def test_builtin_split_slices():
    prompts = load_prompts(PromptSet(source="builtin:harmless", split="eval[10:20]"), "x")
    assert prompts == builtin_prompts("harmless", "eval")[10:20]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path: Path, suffix: str):
    rows = ["first prompt", "second, with a comma", 'third "quoted"']
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n\n")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"prompt": row, "id": i}) for i, row in enumerate(rows)))
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "prompt"])
            writer.writerows([[i, row] for i, row in enumerate(rows)])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": rows}), path)
    column = "text" if suffix == ".txt" else "prompt"
    assert load_prompts(PromptSet(source=str(path), split="", column=column), "x") == rows
    assert load_prompts(PromptSet(source=str(path), split="[1:]", column=column), "x") == rows[1:]


def test_dataset_ids_need_the_datasets_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"pip install datasets \(or the datasets extra\)"):
        load_prompts(PromptSet(source="someone/harmful-prompts"), "--harmful-train")


def test_dataset_ids_go_through_datasets(monkeypatch):
    import sys
    import types

    calls = []

    class FakeDataset:
        column_names = ("text",)

        def __getitem__(self, column):
            return [f"prompt {i}" for i in range(5)]

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_prompts(PromptSet(source="someone/prompts", split="test[:2]"), "x") == [
        "prompt 0",
        "prompt 1",
    ]
    assert calls == [("someone/prompts", "test")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train", Split("train", None, None)),
        ("eval[:50]", Split("eval", None, 50)),
        ("train[10:-5]", Split("train", 10, -5)),
        ("train[10:20]", Split("train", 10, 20)),
        ("train[-5:]", Split("train", -5, None)),
        ("train[:]", Split("train", None, None)),
        ("[1:]", Split("", 1, None)),
        ("", Split("", None, None)),
    ],
)
def test_split_syntax(text, expected):
    assert Split.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["train[[5]", "train[-:5]", "train[:-]", "train[-:]", "train[--1:]", "train[5]", "train[1:2:3]"]
)
def test_bad_split_syntax(text):
    with pytest.raises(UserError, match=r"^bad split .*: use a name with an optional slice"):
        Split.parse(text)


def write_table(path: Path, values: list) -> None:
    """Write `values` as the column "prompt" of a jsonl, csv or parquet file, None as that format's null."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": value}) + "\n" for value in values))
    elif path.suffix == ".csv":
        path.write_text("id,prompt\n" + "".join(f"{i},{value or ''}\n" for i, value in enumerate(values)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array(values, pa.string())}), path)


@pytest.mark.parametrize(
    ("suffix", "place"),
    [(".jsonl", "line 3"), (".csv", "line 4"), (".parquet", "row 2 (counting from 0)")],
)
@pytest.mark.parametrize("empty", [None, "  "])
def test_a_null_or_blank_cell_is_an_error_naming_its_place(tmp_path: Path, suffix, place, empty):
    path = tmp_path / f"prompts{suffix}"
    write_table(path, ["first", "second", empty, "fourth"])
    spec = PromptSet(source=str(path), split="", column="prompt")
    with pytest.raises(UserError) as error:
        load_prompts(spec, "--harmful-train")
    assert str(error.value) == (
        f"--harmful-train: {path} {place} has no text in column 'prompt'; fill it in, remove the row "
        "or choose a split that leaves it out"
    )
    # Only the rows the split selects need text.
    assert load_prompts(spec.model_copy(update={"split": "[:2]"}), "x") == ["first", "second"]


def test_a_csv_row_without_the_cell_is_an_error(tmp_path: Path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,id\nfirst,0\n\nsecond\n")  # the blank line is skipped but counted
    with pytest.raises(UserError, match=r"prompts.csv line 4 has no text in column 'id'"):
        load_prompts(PromptSet(source=str(path), split="", column="id"), "x")


def test_blank_lines_of_a_text_file_are_skipped(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n   \nsecond\n")
    assert load_prompts(PromptSet(source=str(path), split=""), "x") == ["first", "second"]


def test_a_null_in_a_dataset_column_is_an_error(monkeypatch):
    import sys
    import types

    class FakeDataset:
        column_names = ("text",)

        def __getitem__(self, column):
            return ["prompt 0", None, "prompt 2"]

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(
        UserError, match=r"^x: dataset 'someone/prompts' row 1 \(counting from 0\) has no text"
    ):
        load_prompts(PromptSet(source="someone/prompts"), "x")


def test_a_jsonl_row_without_the_column_lists_the_columns_it_has(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "bake bread"}\n{"question": "fix a bike", "label": 0}\n')
    with pytest.raises(
        UserError,
        match=r"^x: \S+prompts.jsonl line 2 has no column 'text' \(columns: question, label\); choose it",
    ):
        load_prompts(PromptSet(source=str(path), split=""), "x")
