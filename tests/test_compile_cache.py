"""torch.compile's caches go to the study's folder, where a resumed study finds them again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from abliterate.compiled import keep_compiled_code_in, users_environment

# A fresh process, as a study is: importing our pipeline imports torch._dynamo, which sets
# TORCHINDUCTOR_CACHE_DIR to torch's default before the study knows its folder.
COMPILE_IN_A_STUDY_FOLDER = """
import os
import sys
from pathlib import Path
import torch
if sys.argv[3] == "dynamo-first":  # as a notebook that compiled something before importing us
    import torch._dynamo
import abliterate.pipeline
from abliterate.compiled import keep_compiled_code_in
keep_compiled_code_in(Path(sys.argv[1]))
if sys.argv[2] == "compile":
    torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.randn(8))
print(os.environ["TORCHINDUCTOR_CACHE_DIR"])
"""


def compile_in(folder: Path, cache_dir: Path | None, compile: bool = True, dynamo_first: bool = False) -> str:
    """Run a study's set-up in a fresh process and compile a function; the cache place it used."""
    environment = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    if cache_dir is not None:
        environment["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    src = Path(__file__).resolve().parents[1] / "src"
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), environment.get("PYTHONPATH")]))
    flags = ["compile" if compile else "no", "dynamo-first" if dynamo_first else "us-first"]
    command = [sys.executable, "-c", COMPILE_IN_A_STUDY_FOLDER, str(folder), *flags]
    run = subprocess.run(command, check=True, env=environment, capture_output=True, text=True)
    return run.stdout.strip()


@pytest.mark.slow
def test_compiled_code_lands_in_the_study_folder(tmp_path):
    assert compile_in(tmp_path / "study", cache_dir=None) == str(tmp_path / "study" / "compile-cache")
    assert (tmp_path / "study" / "compile-cache" / "fxgraph").is_dir()


def test_a_cache_place_the_user_named_stays_theirs(tmp_path):
    mine = tmp_path / "mine"
    assert compile_in(tmp_path / "study", cache_dir=mine, compile=False) == str(mine)


def test_torchs_own_default_is_no_choice_of_the_users(tmp_path):
    study = tmp_path / "study"
    assert compile_in(study, cache_dir=None, compile=False, dynamo_first=True) == str(study / "compile-cache")


def test_a_second_study_in_one_process_takes_the_triton_kernels_to_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("abliterate.CHOSEN_COMPILE_CACHE", None)
    monkeypatch.setattr("abliterate.CHOSEN_TRITON_CACHE", None)
    keep_compiled_code_in(tmp_path / "first")
    # What inductor's first Triton kernel does (on a GPU): it fixes the place under the first folder.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "first" / "compile-cache" / "triton" / "0"))
    keep_compiled_code_in(tmp_path / "second")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "second" / "compile-cache")
    assert "TRITON_CACHE_DIR" not in os.environ  # inductor derives it from the second folder
    assert "TRITON_CACHE_DIR" not in users_environment()
