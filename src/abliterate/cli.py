"""Command line: a thin layer that turns flags into `Settings` and calls `pipeline.run`.

Flags are generated from the settings fields, so the two can never disagree. Only flags the user
gave are passed on, so environment variables and the TOML file still apply to the rest. A user's
mistake ends as one line on stderr with a non-zero exit code; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.errors import SettingsError, UserError
from abliterate.settings import Settings, load_settings

PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other mistake, instead of the whole usage."""
        raise SettingsError(f"{message}; see `abliterate --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="abliterate",
        description="Remove refusals from a chat model by directional ablation, tuned with Optuna.",
        epilog="Every option can also be set as ABLITERATE_<NAME> (a prompt set's part as "
        "ABLITERATE_HARMFUL_EVAL__SPLIT) or in config.toml (names with underscores; the prompt sets "
        "are tables: [harmful_eval] split = ...).",
    )
    parser.add_argument("--version", action="version", version=f"abliterate {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: ./config.toml if present)")
    for name, field in Settings.model_fields.items():
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
                f"{flag}-column", dest=f"{name}.column", metavar="COLUMN", help="column holding the prompt"
            )
            continue
        default = field.default
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = field.description
        if default is not None and "default:" not in (help_text or ""):
            help_text = f"{help_text} (default: {shown})"
        if field.annotation is bool or "true" in typing.get_args(field.annotation):
            # `--chat` alone means true; `--cache-weights false` is spelled out.
            metavar = (field.json_schema_extra or {}).get("metavar", "true|false")
            parser.add_argument(flag, dest=name, metavar=metavar, nargs="?", const="true", help=help_text)
        else:
            metavar = (field.json_schema_extra or {}).get("metavar", name.split("_")[-1].upper())
            parser.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    return parser


def parse_settings(argv: list[str]) -> Settings:
    arguments = vars(build_parser().parse_args(argv))
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
