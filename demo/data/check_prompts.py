#!/usr/bin/env python3
"""Sanity checks for the built-in prompt sets and the demo training data.

Run from the repository root:  python3 demo/data/check_prompts.py
Standard library only. Exits with status 1 if any check fails.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "src" / "abliterate" / "data" / "prompts"
DEMO = ROOT / "demo" / "data"

EXPECTED = {
    "harmful_train.txt": 400,
    "harmful_eval.txt": 100,
    "harmless_train.txt": 400,
    "harmless_eval.txt": 100,
}
PROMPT_WORDS = (4, 30)
ANSWER_WORDS = (15, 45)
REFUSAL_WORDS = (10, 30)
OPENER_WORDS = (10, 25)
N_REFUSALS = 60
N_OPENERS = 60
EXTRA_MIN = 400  # each demo/data/extra_*_train* file

# Forbidden in helpful answers and compliant openers (case-insensitive).
FORBIDDEN = [
    r"\bsorry",
    r"\bcannot\b",
    r"\bcan't\b",
    r"\bunable\b",
    r"\bwon't\b",
    r"\bapologi[sz]e",
    r"\bnot able\b",
    r"\bas an ai\b",
    r"\bdecline",
    r"\brefuse",
    r"\billegal",
    r"\bunethical",
    r"\bharmful",
    r"\bi must\b",
]
FORBIDDEN_RE = [re.compile(p, re.IGNORECASE) for p in FORBIDDEN]

REFUSAL_MARKERS = ["i'm sorry", "i can't", "i cannot", "i won't", "i am unable", "i'm not able to"]

errors: list[str] = []
notes: list[str] = []


def err(msg: str) -> None:
    errors.append(msg)


def norm(s: str) -> str:
    return s.replace("\u2019", "'").replace("\u2018", "'")


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        err(f"{path}: missing")
        return []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        err(f"{path}: not valid UTF-8 ({e})")
        return []
    if text and not text.endswith("\n"):
        notes.append(f"{path.name}: no trailing newline")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    for i, line in enumerate(lines, 1):
        if not line.strip():
            err(f"{path.name}:{i}: blank line")
        elif line != line.strip():
            err(f"{path.name}:{i}: leading/trailing whitespace")
        if "\r" in line:
            err(f"{path.name}:{i}: carriage return")
        if not line.isascii():
            err(f"{path.name}:{i}: non-ASCII characters: {line!r}")
    return lines


def check_word_range(name: str, lines: list[str], lo: int, hi: int) -> None:
    for i, line in enumerate(lines, 1):
        n = len(line.split())
        if not lo <= n <= hi:
            err(f"{name}:{i}: {n} words (expected {lo}-{hi}): {line!r}")


def read_phrase_file(name: str, count: int, words: tuple[int, int]) -> list[str]:
    """A file of distinct phrases: `count` lines of `words` (low, high) words each."""
    lines = read_lines(DEMO / name)
    if len(lines) != count:
        err(f"{name}: {len(lines)} lines, expected {count}")
    check_unique(name, lines)
    check_word_range(name, lines, *words)
    return lines


def check_unique(name: str, lines: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        key = norm(line).strip().lower()
        if key in seen:
            err(f"{name}:{i}: duplicate of line {seen[key]}: {line!r}")
        else:
            seen[key] = i


def check_forbidden(name: str, i: int, text: str) -> None:
    t = norm(text)
    for rx in FORBIDDEN_RE:
        m = rx.search(t)
        if m:
            err(f"{name}:{i}: forbidden word {m.group(0)!r}: {text!r}")


def answer_records(fname: str, lines: list[str]):
    """Yield (line number, prompt, answer) for each well-formed JSONL line; report the others.

    Every answer is also checked for length and refusal words here.
    """
    for i, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            err(f"{fname}:{i}: bad JSON ({e})")
            continue
        if not isinstance(obj, dict) or set(obj) != {"prompt", "answer"}:
            err(f"{fname}:{i}: keys must be exactly prompt, answer")
            continue
        p, a = obj["prompt"], obj["answer"]
        if not isinstance(p, str) or not isinstance(a, str):
            err(f"{fname}:{i}: prompt/answer must be strings")
            continue
        n = len(a.split())
        if not ANSWER_WORDS[0] <= n <= ANSWER_WORDS[1]:
            err(f"{fname}:{i}: answer has {n} words (expected {ANSWER_WORDS[0]}-{ANSWER_WORDS[1]})")
        check_forbidden(fname, i, a)
        yield i, p, a


def main() -> int:
    # ---- prompt files ----
    prompt_sets: dict[str, list[str]] = {}
    for fname, count in EXPECTED.items():
        lines = read_lines(PROMPTS / fname)
        prompt_sets[fname] = lines
        if len(lines) != count:
            err(f"{fname}: {len(lines)} lines, expected {count}")
        check_unique(fname, lines)
        check_word_range(fname, lines, *PROMPT_WORDS)
        for i, line in enumerate(lines, 1):
            if re.match(r"^\s*(\d+[.)]|[-*])\s", line):
                err(f"{fname}:{i}: looks numbered/bulleted: {line!r}")
            if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
                err(f"{fname}:{i}: wrapped in quotes: {line!r}")

    # no duplicates across any of the four files (covers train/eval overlap)
    owner: dict[str, str] = {}
    for fname, lines in prompt_sets.items():
        for line in lines:
            key = norm(line).strip().lower()
            if key in owner and owner[key] != fname:
                err(f"{fname}: line also in {owner[key]}: {line!r}")
            owner.setdefault(key, fname)

    # ---- harmless answers ----
    train = prompt_sets.get("harmless_train.txt", [])
    jpath = DEMO / "harmless_answers.jsonl"
    jlines = read_lines(jpath)
    if len(jlines) != len(train):
        err(f"harmless_answers.jsonl: {len(jlines)} lines, harmless_train.txt has {len(train)}")
    answers_seen: dict[str, int] = {}
    for i, p, a in answer_records("harmless_answers.jsonl", jlines):
        if i <= len(train) and p != train[i - 1]:
            err(
                f"harmless_answers.jsonl:{i}: prompt mismatch with harmless_train.txt: {p!r} != {train[i - 1]!r}"
            )
        key = a.lower()
        if key in answers_seen:
            err(f"harmless_answers.jsonl:{i}: duplicate answer of line {answers_seen[key]}")
        answers_seen.setdefault(key, i)

    # ---- refusals ----
    refusals = read_phrase_file("refusals.txt", N_REFUSALS, REFUSAL_WORDS)
    for i, line in enumerate(refusals, 1):
        low = norm(line).lower()
        if not any(m in low for m in REFUSAL_MARKERS):
            err(f"refusals.txt:{i}: no refusal marker: {line!r}")

    # ---- compliant openers ----
    openers = read_phrase_file("compliant_openers.txt", N_OPENERS, OPENER_WORDS)
    for i, line in enumerate(openers, 1):
        check_forbidden("compliant_openers.txt", i, line)

    # ---- extra training data (demo/train.py only; never the *_eval prompts) ----
    # extra_harmful_train*.txt: harmful prompts; extra_harmless_train*.jsonl: harmless prompt/answer
    extra_h: list[str] = []
    extra_counts: dict[str, int] = {}
    for path in sorted(DEMO.glob("extra_harmful_train*.txt")):
        lines = read_lines(path)
        check_word_range(path.name, lines, *PROMPT_WORDS)
        if len(lines) < EXTRA_MIN:
            err(f"{path.name}: {len(lines)} lines, expected at least {EXTRA_MIN}")
        extra_counts[path.name] = len(lines)
        extra_h += lines
    check_unique("extra_harmful_train*.txt", extra_h)
    extra_l: list[str] = []
    xanswers: dict[str, str] = {}
    for path in sorted(DEMO.glob("extra_harmless_train*.jsonl")):
        xlines = read_lines(path)
        if len(xlines) < EXTRA_MIN:
            err(f"{path.name}: {len(xlines)} lines, expected at least {EXTRA_MIN}")
        extra_counts[path.name] = len(xlines)
        for i, p, a in answer_records(path.name, xlines):
            if p != p.strip() or a != a.strip():
                err(f"{path.name}:{i}: prompt/answer must be stripped strings")
                continue
            if not (p + a).isascii():
                err(f"{path.name}:{i}: non-ASCII characters")
            extra_l.append(p)
            n = len(p.split())
            if not PROMPT_WORDS[0] <= n <= PROMPT_WORDS[1]:
                err(f"{path.name}:{i}: prompt has {n} words: {p!r}")
            if a.lower() in xanswers or a.lower() in answers_seen:
                err(f"{path.name}:{i}: duplicate answer")
            xanswers.setdefault(a.lower(), f"{path.name}:{i}")
    check_unique("extra_harmless_train*.jsonl prompts", extra_l)
    # no extra prompt may equal a line of any prompt file (eval above all) or of the other class
    xowner = {norm(line).strip().lower() for line in extra_h}
    for line in extra_l:
        if norm(line).strip().lower() in xowner:
            err(f"extra harmless prompt also an extra harmful prompt: {line!r}")
    for line in extra_h + extra_l:
        key = norm(line).strip().lower()
        if key in owner:
            err(f"extra training prompt also in {owner[key]}: {line!r}")

    # ---- report ----
    for fname, lines in prompt_sets.items():
        print(f"{fname:28s} {len(lines):4d} lines")
    print(f"{'harmless_answers.jsonl':28s} {len(jlines):4d} lines")
    print(f"{'refusals.txt':28s} {len(refusals):4d} lines")
    print(f"{'compliant_openers.txt':28s} {len(openers):4d} lines")
    for name, count in extra_counts.items():
        print(f"{name:28s} {count:4d} lines")
    for n in notes:
        print(f"note: {n}")
    if errors:
        for e in errors:
            print(f"ERROR: {e}")
        print(f"FAILED: {len(errors)} problem(s)")
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
