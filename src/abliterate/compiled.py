"""The compiled decoder: when `--compile auto` turns it on, how a study pins it, and the fallback
when it fails to compile (see `model.enable_compiled_generation` for the decoder itself)."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import optuna
import torch
from rich.console import Console

import abliterate
from abliterate.errors import UserError
from abliterate.evaluate import Evaluator
from abliterate.judge import RefusalCount
from abliterate.model import ChatModel, compiled_generation_blocker, enable_compiled_generation
from abliterate.storage import StudyData
from abliterate.study import pin_scoring


def use_compiled_generation(mode: str, study: optuna.Study, model: ChatModel) -> bool:
    """Turn on the compiled decoder for `--compile true`, and for `auto` where it can serve."""
    if mode == "true":
        enable_compiled_generation(model)  # or says why it cannot
        return True
    # A study begun without it goes on without it: its trials must stay comparable.
    if mode == "false" or StudyData(study).scoring.get("--compile") == "false":
        return False
    if compiled_generation_blocker(model) is not None:
        return False  # a study begun with it is then refused by `pin_scoring`, with the reason
    # auto is for architectures transformers declares compilable as one graph.
    if not getattr(model.model, "_can_compile_fullgraph", False):
        return False
    model.compiled_generation = True
    return True


COMPILE_CACHE = "compile-cache"


def keep_compiled_code_in(output: Path) -> None:
    """torch.compile's on-disk caches (inductor's generated code, Triton's kernels) in the study's
    folder, unless the user's TORCHINDUCTOR_CACHE_DIR names a place: a resumed study, and a worker of
    another machine sharing the folder, load the decoder's kernels instead of compiling them again.

    Set before the first compile; inductor reads the variable whenever it opens its cache. Importing
    torch._dynamo sets it to torch's default in /tmp, so whether the user set it is read when
    abliterate is imported (`CHOSEN_COMPILE_CACHE`), and torch's default never counts as a choice.
    Inductor's first Triton kernel sets TRITON_CACHE_DIR inside that place, for good: a second study
    in the same process drops it, so that its kernels follow it to its own folder.
    """
    if _users_compile_cache() is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(output.resolve() / COMPILE_CACHE)
    if abliterate.CHOSEN_TRITON_CACHE is None:
        os.environ.pop("TRITON_CACHE_DIR", None)


def users_environment() -> dict[str, str]:
    """This process's environment for a worker process, with TORCHINDUCTOR_CACHE_DIR as the user set
    it: torch's default, filled in when torch._dynamo was imported, would pass for the user's choice
    there, and the worker would compile into /tmp instead of the study's folder."""
    environment = dict(os.environ)
    if _users_compile_cache() is None:
        environment.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if abliterate.CHOSEN_TRITON_CACHE is None:
        environment.pop("TRITON_CACHE_DIR", None)
    return environment


def _users_compile_cache() -> str | None:
    """The compile cache place the user chose, if any. What was set when abliterate was imported may
    be torch's default, where torch._dynamo was imported first (a notebook that compiled already)."""
    chosen = abliterate.CHOSEN_COMPILE_CACHE
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(_torchs_default_cache()):
        return None
    return chosen


def _torchs_default_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # torch before 2.6: the same place, /tmp/torchinductor_USER
        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())
    return default_cache_dir()


def pin_decoder(study: optuna.Study, model: ChatModel) -> None:
    pin_scoring(study, {"--compile": str(model.compiled_generation).lower()})


def count_baseline(evaluator: Evaluator, mode: str, console: Console) -> RefusalCount:
    """The original model's refusals; under `--compile auto` a decoder that fails to compile is dropped."""
    try:
        return evaluator.refusals()
    except UserError:
        raise
    except Exception as error:  # torch.compile fails in many ways: inductor, triton, a missing compiler
        if not evaluator.model.compiled_generation:
            raise
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        if mode == "true":
            raise UserError(
                f"--compile: the compiled decoder failed ({type(error).__name__}: {reason}); "
                "use --compile auto or false"
            ) from error
        console.print(
            f"--compile auto: the compiled decoder failed ({type(error).__name__}: {reason}); generating without it"
        )
        evaluator.model.compiled_generation = False
        torch._dynamo.reset()
        return evaluator.refusals()
