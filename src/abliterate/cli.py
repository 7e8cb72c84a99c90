"""Command line: a thin layer that turns flags into `Settings` and calls `pipeline.run`.

Flags are generated from the settings fields, so the two can never disagree. Only flags the user
gave are passed on, so environment variables and the TOML file still apply to the rest. A user's
mistake ends as one line on stderr with a non-zero exit code; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from abliterate.errors import UserError
from abliterate.settings import PromptSet, Settings, load_settings

PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description="Remove refusals from a chat model by directional ablation, tuned with Optuna.",
        epilog="Every option can also be set as ABLITERATE_<NAME> or in config.toml (names with underscores).",
    )
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
        help_text = f"{field.description} (default: {shown})" if field.description else None
        if field.annotation is bool:
            # `--chat` alone means true; `--cache-weights false` is spelled out.
            parser.add_argument(
                flag, dest=name, metavar="true|false", nargs="?", const="true", help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=help_text)
    return parser


def parse_settings(argv: list[str]) -> Settings:
    parser = build_parser()
    arguments = vars(parser.parse_args(argv))
    config_file = arguments.pop("config")
    given = {key: value for key, value in arguments.items() if value is not None}
    flat = {key: value for key, value in given.items() if "." not in key and key not in PROMPT_SETS}
    prompt_parts = {key: value for key, value in given.items() if key not in flat}
    if not prompt_parts:
        return load_settings(flat, config_file)
    # A flag may change one part of a prompt set (say its split) and keep the rest from lower sources.
    base = load_settings(flat, config_file)
    for name in PROMPT_SETS:
        update: dict[str, Any] = {
            part.split(".")[1]: value for part, value in prompt_parts.items() if part.startswith(name + ".")
        }
        if name in prompt_parts:
            update["source"] = prompt_parts[name]
        if update:
            flat[name] = _merged(getattr(base, name), update)
    return load_settings(flat, config_file)


def _merged(current: BaseModel, update: dict[str, Any]) -> dict[str, Any]:
    if "source" in update and update["source"] != current.source and "column" not in update:
        # A new source starts from the defaults, not from the old source's column.
        current = PromptSet(source=update["source"], split=current.split)
    return {**current.model_dump(), **update}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("ABLITERATE_DEBUG", "").lower() in ("1", "true")
    try:
        settings = parse_settings(argv)
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
