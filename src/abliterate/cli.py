"""Command line: a thin layer that turns flags into `Settings` and calls `pipeline.run`.

Flags are generated from the settings fields, so the two can never disagree. Only flags the user
gave are passed on, so environment variables and the TOML file still apply to the rest. A user's
mistake ends as one line on stderr with a non-zero exit code; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from abliterate import __version__
from abliterate.errors import SettingsError, UserError
from abliterate.settings import Settings, load_settings

PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")
# `--help` by topic; every setting is in exactly one group (a test checks).
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model", "dtypes", "device_map", "quantization", "trust_remote_code", "chat_template", "system_prompt",
        "enable_thinking",
    ),
    "prompts and scoring": (
        *PROMPT_SETS, "refusal_markers", "refusal_judge", "refusal_classifier", "max_response_length", "kl_tokens",
    ),
    "search": (
        "n_trials", "time_budget", "n_startup_trials", "warm_starts", "warm_start_depths", "skip_dominated",
        "search_space", "seed", "direction_scope", "direction", "row_norm",
    ),
    "weight reset between trials": ("reset", "cache_weights", "verify_restore"),
    "output and study": ("output", "select", "chat", "push_to_hub", "hub_private", "storage", "study_name"),
    "speed and scale": ("batch_size", "compile", "workers", "gpus"),
    "other": ("debug",),
}  # fmt: skip
# `abliterate evaluate` scores a model as a study would: it takes the settings that scoring reads
# (the eval prompts, not the train prompts that find directions).
EVALUATE_GROUPS: dict[str, tuple[str, ...]] = {
    "model (and the original)": HELP_GROUPS["model"],
    "prompts and scoring": tuple(name for name in HELP_GROUPS["prompts and scoring"] if "_train" not in name),
    "other": ("batch_size", "debug"),
}


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"give a whole number above 0 (got {text!r})")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other mistake, instead of the whole usage."""
        raise SettingsError(f"{message}; see `{self.prog} --help`")


def build_parser(command: str = "study") -> argparse.ArgumentParser:
    """The flags of a study (`abliterate ...`), of `abliterate evaluate ...` or `abliterate chat DIR`."""
    if command == "report":
        parser = _Parser(
            prog="abliterate report",
            description="Rebuild report.html and pareto.png of a study's output folder from the study.",
        )
        parser.add_argument(
            "--output", type=Path, required=True, metavar="DIR", help="the study's output folder"
        )
        parser.add_argument(
            "--storage", metavar="URL", help="the study's storage URL (default: the folder's study.journal)"
        )
        parser.add_argument(
            "--study-name", metavar="NAME", help="the study's name (default: the storage's only study)"
        )
        return parser
    if command == "chat":
        parser = _Parser(
            prog="abliterate chat",
            description="Chat with a saved model folder (or any model); replies stream. /original answers "
            "with the model it was made from, /reset clears the history.",
        )
        parser.add_argument("folder", help="the saved model (output/model), or any folder or hub id")
        parser.add_argument(
            "--original", help="the source model for /original (default: the one abliterate.json names)"
        )
        parser.add_argument(
            "--max-new-tokens",
            type=positive_int,
            default=256,
            metavar="N",
            help="longest reply (default: 256)",
        )
        loading = tuple(name for name in HELP_GROUPS["model"] if name != "model")
        _add_settings(parser, {"model": loading, "other": ("debug",)})
        return parser
    if command == "evaluate":
        parser = _Parser(
            prog="abliterate evaluate",
            description="Score a model against its original as a study scores a trial: refusals on the "
            "harmful eval prompts, KL on the harmless ones. Prints them and writes them as JSON.",
        )
        parser.add_argument("--original", required=True, help="the model it was made from (hub id or folder)")
        parser.add_argument(
            "--json", type=Path, help="where to write the scores (default: ./evaluation-<model>.json)"
        )
        tasks = parser.add_argument_group(
            "capability benchmarks (lm-evaluation-harness: pip install lm-eval)"
        )
        tasks.add_argument(
            "--tasks", metavar="TASK,...", help="lm-eval tasks to run on both models, e.g. mmlu,gsm8k"
        )
        tasks.add_argument(
            "--task-path", type=Path, metavar="DIR", help="a folder of your own task YAML files"
        )
        tasks.add_argument("--task-limit", type=int, metavar="N", help="at most N examples of each task")
        _add_settings(parser, EVALUATE_GROUPS)
        return parser
    parser = _Parser(
        prog="abliterate",
        description="Remove refusals from a chat model by directional ablation, tuned with Optuna. "
        "Other commands: `abliterate evaluate` (score any model against its original), `abliterate chat "
        "DIR` (talk to a saved model), `abliterate report --output DIR` (rebuild a study's report); "
        "each has its own --help.",
        epilog="Every option can also be set as ABLITERATE_<NAME> (a prompt set's part as "
        "ABLITERATE_HARMFUL_EVAL__SPLIT) or in config.toml (names with underscores; the prompt sets "
        "are tables: [harmful_eval] split = ...).",
    )
    parser.add_argument("--version", action="version", version=f"abliterate {__version__}")
    _add_settings(parser, HELP_GROUPS)
    return parser


def _add_settings(parser: argparse.ArgumentParser, groups: dict[str, tuple[str, ...]]) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default: ./config.toml if present)")
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_setting(group, name, Settings.model_fields[name])


def _add_setting(parser: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    """The flag (or, for a prompt set, the flags) of one setting."""
    flag = "--" + name.replace("_", "-")
    if name in PROMPT_SETS:
        default = field.default
        parser.add_argument(
            flag,
            dest=name,
            metavar="SOURCE",
            help=f"builtin:harmful|builtin:harmless, a .txt/.jsonl/.csv/.parquet file or a dataset id (default: {default.source})",
        )
        parser.add_argument(
            f"{flag}-split",
            dest=f"{name}.split",
            metavar="SPLIT",
            help=f"split with optional slice, e.g. train[:200] (default: {default.split})",
        )
        parser.add_argument(
            f"{flag}-column",
            dest=f"{name}.column",
            metavar="COLUMN",
            help=f"column holding the prompt (default: {default.column})",
        )
        return
    default = field.default
    if isinstance(default, bool):
        shown = str(default).lower()  # as the flag is spelled: --cache-weights false
    else:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
    help_text = field.description
    if default is not None and "default:" not in (help_text or ""):
        help_text = f"{help_text} (default: {shown})"
    if field.annotation is bool or {bool, "true"} & set(typing.get_args(field.annotation)):
        # `--chat` alone means true; `--cache-weights false` is spelled out.
        metavar = (field.json_schema_extra or {}).get("metavar", "true|false")
        parser.add_argument(flag, dest=name, metavar=metavar, nargs="?", const="true", help=help_text)
    else:
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
        fallback = "|".join(choices) if choices else name.split("_")[-1].upper()
        metavar = (field.json_schema_extra or {}).get("metavar", fallback)
        parser.add_argument(flag, dest=name, metavar=metavar, help=help_text)


def parse_settings(argv: list[str], command: str = "study") -> Settings:
    return settings_from(vars(build_parser(command).parse_args(argv)))


def settings_from(arguments: dict[str, Any]) -> Settings:
    """Settings from parsed flags: only those given, so the other sources show through."""
    config_file = arguments.pop("config")
    values: dict[str, Any] = {}
    for key, value in arguments.items():
        if value is None:
            continue
        # `--harmful-eval-split X` sets one part of a prompt set; the other sources fill the rest.
        name, _, part = key.partition(".")
        if name in PROMPT_SETS:
            values.setdefault(name, {})[part or "source"] = value
        else:
            values[key] = value
    return load_settings(values, config_file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Nothing leaves the machine unless the user asks for it: no usage reports to the hub.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Known before the settings load, so that a settings error can show its traceback too.
    debug = "--debug" in argv or os.environ.get("ABLITERATE_DEBUG", "").lower() in ("1", "true")
    try:
        if argv[:1] == ["evaluate"]:
            return evaluate(argv[1:])
        if argv[:1] == ["chat"]:
            return chat(argv[1:])
        if argv[:1] == ["report"]:
            return report(argv[1:])
        settings = parse_settings(argv)
        debug = debug or settings.debug  # `debug = true` in the config file
        from abliterate.pipeline import run  # heavy imports (torch, transformers) only once flags are valid

        run(settings)
        return 0
    except UserError as error:
        if debug:
            raise
        print(f"abliterate: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(
            "\nabliterate: interrupted. Finished trials are kept in the study; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


def evaluate(argv: list[str]) -> int:
    """`abliterate evaluate`: print a model's refusals and KL beside its original's, and save them."""
    arguments = vars(build_parser("evaluate").parse_args(argv))
    original, json_path = arguments.pop("original"), arguments.pop("json")
    task_names, task_path, task_limit = (arguments.pop(key) for key in ("tasks", "task_path", "task_limit"))
    settings = settings_from(arguments)
    from rich.console import Console

    from abliterate import compare
    from abliterate.pipeline import quiet_libraries

    tasks = None
    if task_names is not None:
        names = [name.strip() for name in task_names.split(",") if name.strip()]
        if not names:
            raise UserError("--tasks is empty; name lm-eval tasks, e.g. --tasks mmlu,gsm8k")
        if task_limit is not None and task_limit <= 0:
            raise UserError("--task-limit must be a positive number of examples")
        tasks = compare.TaskRequest(names, task_path, task_limit)
    elif task_path is not None or task_limit is not None:
        raise UserError("--task-path and --task-limit go with --tasks; name the tasks to run")
    json_path = json_path or compare.default_json_path(compare.model_to_score(settings))
    compare.check_writable(json_path)
    quiet_libraries()
    evaluation = compare.evaluate_model(settings, original, Console(stderr=True, highlight=False), tasks)
    compare.write_json(evaluation, json_path)
    console = Console(highlight=False)
    console.print(compare.evaluation_table(evaluation))
    if evaluation.tasks is not None:
        console.print(compare.task_table(evaluation))
        if compare.record_tasks_in_card(evaluation):
            print(f"task scores added to the model card, {Path(settings.model) / 'README.md'}")
    print(f"written to {json_path}")
    return 0


def chat(argv: list[str]) -> int:
    """`abliterate chat DIR`: talk to a saved model without a study (nothing is scored or written)."""
    arguments = vars(build_parser("chat").parse_args(argv))
    folder, original, max_new_tokens = (
        arguments.pop(key) for key in ("folder", "original", "max_new_tokens")
    )
    settings = settings_from({**arguments, "model": folder})
    from rich.console import Console

    from abliterate.chat import Chat, chat_loop
    from abliterate.evaluate import load_for_scoring
    from abliterate.export import source_of_saved_model
    from abliterate.pipeline import quiet_libraries

    quiet_libraries()
    console = Console(highlight=False)
    original = original or source_of_saved_model(Path(folder))

    @functools.cache  # each model loads once, when first asked for
    def loaded(source: str):
        console.print(f"loading {source}")
        return load_for_scoring(source, settings)

    the_original = (lambda: loaded(original)) if original else None
    chat_loop(Chat(lambda: loaded(folder), the_original, console, max_new_tokens))
    return 0


def report(argv: list[str]) -> int:
    """`abliterate report --output DIR`: report.html and pareto.png again, from the study alone."""
    arguments = build_parser("report").parse_args(argv)
    output: Path = arguments.output
    if not output.is_dir():
        raise UserError(f"--output {output} is not a folder; give the output folder of a study")
    from abliterate.storage import folder_holds_study, folder_storage_url

    if arguments.storage is None and not folder_holds_study(output):
        raise UserError(f"{output} holds no study; give the study's --storage and --study-name")
    storage = arguments.storage or folder_storage_url(output)
    import optuna

    from abliterate.export import saved_trial_number
    from abliterate.pipeline import quiet_libraries
    from abliterate.report import load_samples, write_report
    from abliterate.select import finished_trial
    from abliterate.storage import open_storage

    quiet_libraries()
    opened = open_storage(storage, existing=True)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(opened)]
    name = arguments.study_name or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise UserError(f"choose the study with --study-name: {', '.join(names) or 'the storage holds none'}")
    study = optuna.load_study(study_name=name, storage=opened)
    number = saved_trial_number(output / "model")
    saved = finished_trial(study, number) if number is not None else None
    written = write_report(study, output, saved, load_samples(output) if saved is not None else [])
    print(f"report: {' and '.join(str(path) for path in reversed(written))}")
    return 0
