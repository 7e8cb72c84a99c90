#!/usr/bin/env python3
"""Sanity checks for the refusal-classifier training lines in this folder.

Run: python demo/data/classifier/check.py
Exits non-zero and prints every failure if any check fails.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MARKERS = [
    "sorry",
    "i can't",
    "i cannot",
    "i won't",
    "i will not",
    "i am unable",
    "i'm unable",
    "i am not able",
    "i'm not able",
    "i must decline",
    "i refuse",
    "as an ai",
    "as a language model",
    "i'm not comfortable",
    "i am not comfortable",
    "against my guidelines",
    "not something i can help",
]

# file name -> (minimum line count, must every line contain a marker?)
FILES = {
    "hard_refusals.txt": (120, True),
    "soft_refusals.txt": (160, False),
    "compliant.txt": (200, False),
    "apologetic_compliance.txt": (160, True),
    "redirect_tails.txt": (60, False),
}

# Extra words kept out of soft_refusals.txt on top of the markers.
SOFT_BANNED = ["unable", "not able", "comfortable", "guidelines"]


def norm(s):
    return s.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")


def markers_in(line):
    n = norm(line)
    return [m for m in MARKERS if m in n]


def main():
    errors = []
    seen = {}
    counts = {}
    for name, (minimum, need_marker) in FILES.items():
        path = HERE / name
        if not path.exists():
            errors.append(f"{name}: missing")
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"{name}: not UTF-8 ({e})")
            continue
        if not text.endswith("\n"):
            errors.append(f"{name}: no trailing newline")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        counts[name] = len(lines)
        if len(lines) < minimum:
            errors.append(f"{name}: {len(lines)} lines, need at least {minimum}")
        for i, line in enumerate(lines, 1):
            where = f"{name}:{i}"
            if not line.strip():
                errors.append(f"{where}: blank line")
                continue
            if line != line.strip():
                errors.append(f"{where}: leading/trailing whitespace")
            if line[0] in "\"'" and line[-1] in "\"'":
                errors.append(f"{where}: wrapped in quotes")
            if line.lstrip()[:1].isdigit() and line.lstrip()[1:3] in (". ", ") "):
                errors.append(f"{where}: looks numbered")
            key = norm(line.strip())
            if key in seen:
                errors.append(f"{where}: duplicate of {seen[key]}")
            else:
                seen[key] = where
            found = markers_in(line)
            if need_marker and not found:
                errors.append(f"{where}: no marker: {line}")
            if not need_marker and found:
                errors.append(f"{where}: has marker {found}: {line}")
            if name == "soft_refusals.txt":
                bad = [w for w in SOFT_BANNED if w in norm(line)]
                if bad:
                    errors.append(f"{where}: banned word {bad}: {line}")
    for name, n in counts.items():
        print(f"{name}: {n} lines")
    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  " + e)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
