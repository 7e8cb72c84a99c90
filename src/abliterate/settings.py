"""One validated settings object.

Sources, highest priority first: command line, environment (`ABLITERATE_*`), a TOML file
(`--config`, default `./config.toml` if present), defaults. The command line is parsed in
`cli.py`, which passes only the options the user actually gave, so the lower sources still show
through for everything else.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from abliterate.conflicts import reset_conflict, row_norm_conflict
from abliterate.errors import SettingsError

ResetName = Literal["auto", "gpu-cache", "host-cache", "disk", "reload", "adapter"]
RowNorm = Literal["none", "pre", "full"]
DirectionScope = Literal["global", "per-layer", "search"]
Quantization = Literal["none", "bnb-4bit"]
CompileMode = Literal["auto", "true", "false"]
DirectionMethod = Literal["mean-difference", "projected", "search", "choose"]
SpaceName = Literal["calibrated", "wide"]
RefusalJudgeName = Literal["markers", "classifier", "both"]


class PromptSet(BaseModel):
    """Where one of the four prompt sets comes from.

    `source` is `builtin:harmful` / `builtin:harmless`, a local file (.txt, .jsonl, .csv,
    .parquet) or a Hugging Face dataset id. `split` names a split and optionally slices it, in
    the `datasets` syntax: `train`, `eval[:50]`, `train[100:300]`.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    split: str = "train"
    column: str = Field("text", description="column holding the prompt (jsonl, csv, parquet, datasets)")


PROMPT_SET_DEFAULTS = {
    "harmful_train": {"source": "builtin:harmful", "split": "train"},
    "harmless_train": {"source": "builtin:harmless", "split": "train"},
    "harmful_eval": {"source": "builtin:harmful", "split": "eval"},
    "harmless_eval": {"source": "builtin:harmless", "split": "eval"},
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ABLITERATE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # -- model ------------------------------------------------------------------------------
    model: str | None = Field(None, description="hub id or local folder; default: the built-in demo model")
    dtypes: Annotated[list[str], NoDecode] = Field(
        ["auto", "bfloat16", "float16", "float32"],
        description="dtypes to try in order when loading (comma-separated)",
    )
    device_map: str = Field("auto", description="accelerate device map: auto, cpu, cuda, cuda:1, ...")
    quantization: Quantization = Field(
        "none",
        description="bnb-4bit: load the weights in 4-bit NF4 (bitsandbytes) so that larger models fit; "
        "trials then edit through the adapter, and the saved model is full precision",
    )
    trust_remote_code: bool = Field(
        False, description="run code shipped with the model (only for models you trust)"
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template file, for tokenizers without one"
    )
    system_prompt: str | None = Field(None, description="system message put before every prompt")
    enable_thinking: bool | None = Field(
        None,
        description="reasoning models: passed to chat templates that take it (false: answer without "
        "a thinking block); default: the template's own. Thinking blocks never count as refusals",
        json_schema_extra={"metavar": "true|false"},
    )

    # -- prompts ----------------------------------------------------------------------------
    harmful_train: PromptSet = PromptSet(**PROMPT_SET_DEFAULTS["harmful_train"])
    harmless_train: PromptSet = PromptSet(**PROMPT_SET_DEFAULTS["harmless_train"])
    harmful_eval: PromptSet = PromptSet(**PROMPT_SET_DEFAULTS["harmful_eval"])
    harmless_eval: PromptSet = PromptSet(**PROMPT_SET_DEFAULTS["harmless_eval"])
    refusal_markers: Annotated[list[str] | None, NoDecode] = Field(
        None, description="substrings that mark a refusal (comma-separated); default: the shipped list"
    )
    refusal_judge: RefusalJudgeName = Field(
        "markers",
        description="what counts a refusal: markers (fast: generation stops at the first marker), classifier "
        "(--refusal-classifier reads each whole response), both (a refusal when either says so; each "
        "one's count is kept)",
        json_schema_extra={"metavar": "markers|classifier|both"},
    )
    refusal_classifier: str | None = Field(
        None,
        description="the classifier of --refusal-judge classifier|both: a sequence-classification model (hub "
        "id or folder) with a label like 'refusal' or 'rejection', e.g. ProtectAI/distilroberta-base-"
        "rejection-v1; default: the shipped tiny one (English, for the demo model and tests)",
        json_schema_extra={"metavar": "MODEL"},
    )

    # -- evaluation -------------------------------------------------------------------------
    batch_size: int = Field(0, ge=0, description="prompts per batch; 0 = choose from free memory")
    max_response_length: int = Field(64, gt=0, description="new tokens generated when counting refusals")
    kl_tokens: int = Field(
        1,
        gt=0,
        description="KL over the first N tokens of the original model's own greedy answers to the harmless "
        "prompts (teacher-forced, one forward pass) instead of the first response token alone",
        json_schema_extra={"metavar": "N"},
    )

    compile: CompileMode = Field(
        "auto",
        description="count refusals with a static KV cache that torch.compile turns into CUDA graphs: about "
        "2x faster trials after a one-off compile of 10-90 s. auto: on when the whole model is on one CUDA "
        "GPU and its architecture compiles as one graph, and off again if the compile fails",
        json_schema_extra={"metavar": "auto|true|false"},
    )

    # -- search -----------------------------------------------------------------------------
    n_trials: int = Field(200, gt=0, description="finished trials the study should hold")
    time_budget: float | None = Field(
        None,
        gt=0,
        description="start no trial after this long from the start of the run (90s, 30m, 2h, 1h30m); "
        "--n-trials still caps the study",
        json_schema_extra={"metavar": "DURATION"},
    )
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        description="random trials before TPE takes over; default: 0.3 x --n-trials, between 15 and 60",
        json_schema_extra={"metavar": "N"},
    )
    skip_dominated: bool = Field(
        True,
        description="skip counting the refusals of a trial whose KL is at least that of a trial without "
        "refusals (it cannot reach the front); false counts every trial's, for timings or analysis",
    )
    warm_starts: bool = Field(
        True,
        description="begin a new study with classic edits (one direction, weight 1 on every layer)",
    )
    warm_start_depths: Annotated[list[float], NoDecode] = Field(
        [0.5, 0.3, 0.7, 0.9],
        description="where the warm starts take their directions, as fractions of the depth (comma-"
        "separated; kept inside the --search-space range)",
        json_schema_extra={"metavar": "X,Y,..."},
    )
    search_space: SpaceName = Field(
        "calibrated",
        description="parameter ranges: calibrated (measured on real models) or wide (any depth, as before)",
    )
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the sampler")
    direction_scope: DirectionScope = Field(
        "search",
        description="global: one interpolated direction; per-layer: each layer's own; search: let Optuna choose",
    )
    direction: DirectionMethod = Field(
        "projected",
        description="refusal direction: mean-difference (harmful minus harmless mean), projected "
        "(its part orthogonal to the harmless mean, which leaves what harmless prompts share alone), "
        "search (each trial projects by its own amount, from 0 to 1) or choose (each trial takes "
        "mean-difference or projected)",
    )
    row_norm: RowNorm = Field(
        "none", description="none, pre (edit row-normalized), full (rows keep their norms)"
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL; default: a journal file in the output folder",
        json_schema_extra={"metavar": "URL"},
    )
    study_name: str | None = Field(
        None, description="study name in the storage; default: from the model name"
    )

    workers: int = Field(
        1,
        ge=1,
        description="worker processes on this machine, one per GPU, sharing the study",
        json_schema_extra={"metavar": "N"},
    )
    gpus: Annotated[list[int] | None, NoDecode] = Field(
        None, description="GPUs for the workers (comma-separated); default: all visible"
    )

    # -- weight reset -----------------------------------------------------------------------
    reset: ResetName = Field("auto", description="how weights return to the original between trials")
    cache_weights: bool = Field(True, description="false: keep no cache, reload editable tensors from disk")
    verify_restore: bool = Field(
        False, description="hash editable tensors after every reset and stop on mismatch"
    )

    # -- result -----------------------------------------------------------------------------
    output: Path | None = Field(
        None, description="output folder (study + saved model); default: abliterated/<model>"
    )
    select: str | None = Field(
        None, description="pick a trial: knee, min-refusals, min-kl, max-kl:X, trial:N, none"
    )
    chat: bool = Field(False, description="chat with the result when done")
    push_to_hub: str | None = Field(
        None,
        description="upload the saved model to this Hugging Face repo (user/name), created if missing",
        json_schema_extra={"metavar": "REPO"},
    )
    hub_private: bool = Field(True, description="create the --push-to-hub repo as private")
    debug: bool = Field(False, description="show tracebacks")

    @model_validator(mode="before")
    @classmethod
    def _complete_prompt_sets(cls, data: Any) -> Any:
        """Sources are deep-merged by pydantic-settings, but not with field defaults: a source that
        sets only `split` of a prompt set keeps the default `source`."""
        if isinstance(data, dict):
            for name, default in PROMPT_SET_DEFAULTS.items():
                if isinstance(data.get(name), str):  # `harmful_eval = "file.jsonl"`: the source alone
                    data[name] = {"source": data[name]}
                if isinstance(data.get(name), dict):
                    data[name] = {**default, **data[name]}
        return data

    @property
    def selection(self) -> Selection | None:
        """`--select`, parsed (None: ask on a terminal, else the knee)."""
        return None if self.select is None else Selection.parse(self.select)

    @model_validator(mode="after")
    def _options_fit_together(self) -> Settings:
        """No option without effect, and none that contradicts another: one line each, before loading."""
        if self.gpus is not None and self.workers == 1:
            raise ValueError(
                "--gpus picks the GPUs of --workers N (N > 1); for one run use --device-map cuda:K"
            )
        if self.gpus is not None and len(self.gpus) > self.workers:
            raise ValueError(
                f"--gpus lists {len(self.gpus)} GPUs for --workers {self.workers}, one GPU each; "
                f"list {self.workers}, or pass --workers {len(self.gpus)}"
            )
        # Conflicts the model need not be loaded to see (a model quantized in its own files is
        # found out at load, by the same words).
        if self.reset == "adapter":
            adapter_because = "--reset adapter"
        elif self.quantization != "none" and self.reset == "auto":
            adapter_because = "4-bit weights are edited through one"
        else:
            adapter_because = None
        conflict = row_norm_conflict(self.row_norm, adapter_because) or reset_conflict(
            self.reset, self.quantization != "none", self.cache_weights
        )
        if conflict:
            raise ValueError(conflict)
        if self.chat and self.select == "none":
            raise ValueError("--chat talks to the saved model, but --select none saves none; pick a trial")
        if self.refusal_classifier is not None and self.refusal_judge == "markers":
            raise ValueError(
                "--refusal-classifier is read by --refusal-judge classifier or both, not markers; pass one of them"
            )
        if self.push_to_hub and self.select == "none":
            raise ValueError(
                "--push-to-hub uploads the saved model, but --select none saves none; pick a trial"
            )
        return self

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """`compile = true` in TOML is a boolean; flags and the environment give text."""
        if isinstance(value, bool):
            return str(value).lower()
        return value.lower() if isinstance(value, str) else value

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration_in_seconds(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("dtypes", "refusal_markers", "gpus", "warm_start_depths", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """Lists come as lists (TOML), as `a,b` (flags, environment) or as JSON `["a", "b"]`."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError("not a valid JSON list; write it as a,b,c") from None
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: list[str]) -> list[str]:
        known = {"auto", "float32", "float16", "bfloat16"}
        if not value:
            raise ValueError("give at least one dtype")
        unknown = [d for d in value if d not in known]
        if unknown:
            raise ValueError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(sorted(known))}")
        return value

    @field_validator("warm_start_depths")
    @classmethod
    def _depths_are_fractions(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one depth, or --warm-starts false for none")
        if any(not 0.0 <= depth <= 1.0 for depth in value):
            raise ValueError("depths are fractions of the model's depth, from 0 (first layer) to 1 (last)")
        return value

    @field_validator("select")
    @classmethod
    def _select_form(cls, value: str | None) -> str | None:
        return value if value is None else str(Selection.parse(value))

    @field_validator("refusal_markers")
    @classmethod
    def _markers_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one marker")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML source reads `toml_file` from the class config, set per call by `load_settings`.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `30m`, `2h` or `1h30m`."""
    compact = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        return float(compact)
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", compact)
    if not compact or parts is None:
        raise ValueError("write a duration as 90s, 30m, 2h or 1h30m")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class Selection:
    """One `--select` value: a rule, and for `max-kl:X` and `trial:N` its argument."""

    rule: str
    argument: float | int | None = None

    @classmethod
    def parse(cls, text: str) -> Selection:
        """`knee`, `min-refusals`, `min-kl`, `none`, `trial:N` or `max-kl:X` (X > 0); else ValueError."""
        rule, colon, argument = text.strip().partition(":")
        if rule in ("knee", "min-refusals", "min-kl", "none") and not colon:
            return cls(rule)
        if rule == "trial" and argument.isdigit():
            return cls(rule, int(argument))
        if rule == "max-kl":
            try:
                limit = float(argument)
            except ValueError:
                limit = 0.0
            if limit > 0:
                return cls(rule, limit)
        raise ValueError("use knee, min-refusals, min-kl, max-kl:X, trial:N or none")

    @property
    def trial_number(self) -> int:
        assert self.rule == "trial", self
        return int(self.argument)

    @property
    def kl_limit(self) -> float:
        assert self.rule == "max-kl", self
        return float(self.argument)

    def __str__(self) -> str:
        if self.rule == "trial":
            return f"trial:{self.argument}"
        if self.rule == "max-kl":
            return f"max-kl:{self.argument:g}"
        return self.rule


ENV_PREFIX = "ABLITERATE_"
# Variables with the prefix that are not settings: the hand-over to worker processes, the tests' database.
NOT_SETTINGS = {
    "ABLITERATE_WORKER_SETTINGS", "ABLITERATE_WORKER_NAME", "ABLITERATE_WORKER_LOADED_FD", "ABLITERATE_WORKER_FOLLOWS",
    "ABLITERATE_TEST_POSTGRES_URL",
}  # fmt: skip


def setting_names() -> list[str]:
    """Every name a setting goes by in TOML: top-level fields, and `set.part` for the prompt sets."""
    names = []
    for name in Settings.model_fields:
        if name in PROMPT_SET_DEFAULTS:
            names += [f"{name}.{part}" for part in PromptSet.model_fields]
        else:
            names.append(name)
    return names


def check_environment(environment: dict[str, str] | None = None) -> None:
    """An ABLITERATE_ variable that names no setting is a mistake, not something to ignore quietly."""
    environment = os.environ if environment is None else environment
    known = {name.replace(".", "__").upper() for name in setting_names()}
    for variable in sorted(environment):
        upper = variable.upper()
        if (
            upper.startswith(ENV_PREFIX)
            and upper not in NOT_SETTINGS
            and upper[len(ENV_PREFIX) :] not in known
        ):
            closest = _closest(upper[len(ENV_PREFIX) :], known)
            hint = f" (did you mean {ENV_PREFIX}{closest}?)" if closest else ""
            raise SettingsError(f"unknown environment variable {variable}{hint}; see `abliterate --help`")


def _where_set(location: list[str], config_file: Path | None, cli_values: dict[str, Any] | None) -> str:
    """How the user wrote the setting at `location`: `--n-trials`, `ABLITERATE_N_TRIALS` or
    `n_trials in config.toml` (a prompt set's part: `--harmful-eval-split`, `ABLITERATE_HARMFUL_EVAL__SPLIT`,
    `harmful_eval.split in config.toml`)."""
    flag = "--" + "-".join(part.replace("_", "-") for part in location)
    if not location or cli_values is None:
        return flag
    given = cli_values.get(location[0])
    if given is not None and (len(location) == 1 or not isinstance(given, dict) or location[1] in given):
        return flag
    variable = ENV_PREFIX + "__".join(location).upper()
    if variable in {name.upper() for name in os.environ}:
        return variable
    if config_file is not None:
        return f"{'.'.join(location)} in {config_file}"
    return flag


def _closest(name: str, known: set[str] | list[str]) -> str | None:
    matches = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return matches[0] if matches else None


def load_settings(cli_values: dict[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """Build the settings from all sources, turning any validation error into one clear line."""
    check_environment()
    if config_file is None and Path("config.toml").is_file():
        config_file = Path("config.toml")
    elif config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    settings_cls = Settings
    if config_file is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        settings_cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**(cli_values or {}))
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, config_file, cli_values or {})) from None
    except Exception as error:  # a TOML syntax error surfaces as a plain exception
        if config_file is not None:
            raise SettingsError(f"cannot read {config_file}: {error}") from None
        raise


def describe_validation_error(
    error: ValidationError, config_file: Path | None, cli_values: dict[str, Any] | None = None
) -> str:
    """The first problem of a ValidationError, as `--option: message (got value)`, the option named
    where its value came from: a flag, an environment variable or the config file."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"] if not isinstance(part, int)]  # not a list's index
    option = _where_set(location, config_file, cli_values)
    if first["type"] == "extra_forbidden":
        where = f" in {config_file}" if config_file else ""
        name = ".".join(location)
        prompt_set, _, part = name.rpartition("_")
        if prompt_set in PROMPT_SET_DEFAULTS and part in PromptSet.model_fields:
            hint = f" (write it as {part} = ... under [{prompt_set}])"
        else:
            closest = _closest(name, setting_names())
            hint = f" (did you mean {closest!r}?)" if closest else ""
        return f"unknown setting {name!r}{where}{hint}; see `abliterate --help` for the valid names"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = first.get("input")
    shown = (
        f" (got {given!r})" if isinstance(given, str | int | float) and not isinstance(given, bool) else ""
    )
    if not location:  # a rule between options: the message names them
        return message
    return f"{option}: {message}{shown}"
