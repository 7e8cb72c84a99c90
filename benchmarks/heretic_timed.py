"""Run heretic-llm's own entry point with timers around its phase methods, for benchmarks/trials.py.

Nothing of heretic is changed on disk or in behaviour: its classes' methods are wrapped with
timers (synchronizing the GPU around each call) before its `main()` runs, configured by the
`config.toml` in the working folder. One JSON line per call: trial number, phase, seconds.

    python benchmarks/heretic_timed.py TIMINGS.jsonl [--continue]   # in the folder holding heretic's config.toml

`--continue` answers heretic's question about the checkpoint an earlier, interrupted run left
("Continue the previous run") as a user would; every later question goes to heretic as before.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import heretic.main
import torch
from heretic.evaluator import Evaluator
from heretic.model import Model

records: list[dict] = []
trial = 0


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(cls: type, method: str, phase: str) -> None:
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        global trial
        if phase == "reset":  # every heretic trial begins with a reset
            trial += 1
        synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize()
            records.append({"trial": trial, "phase": phase, "s": time.perf_counter() - start})

    setattr(cls, method, wrapper)


def answer_continue_once() -> None:
    """Answer heretic's question about the previous run's checkpoint "continue" (heretic 1.4.0 asks
    "How would you like to proceed?" before it loads the model)."""
    ask = heretic.main.prompt_select
    answered = False

    def prompt_select(message, choices):
        nonlocal answered
        if answered or not message.startswith("How would you like to proceed"):
            return ask(message, choices)
        answered = True
        return "continue"

    heretic.main.prompt_select = prompt_select


def main() -> int:
    output = sys.argv[1]
    if "--continue" in sys.argv[2:]:
        answer_continue_once()
    sys.argv = ["heretic"]  # heretic parses the command line too: it gets none, only its config.toml
    timed(Model, "reset_model", "reset")
    timed(Model, "abliterate", "edit")
    timed(Model, "get_logprobs_batched", "kl_logprobs")
    timed(Evaluator, "count_refusals", "refusals")
    code = 0
    try:
        heretic.main.main()
    except EOFError:
        pass  # after the study, heretic asks which trial to keep; stdin is empty on purpose
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        with open(output, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
