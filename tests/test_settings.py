"""Settings: sources in order of priority, and flags generated from the fields."""

import re
from pathlib import Path

import pytest

from abliterate.cli import build_parser, parse_settings
from abliterate.errors import SettingsError
from abliterate.settings import Selection, Settings, load_settings


def test_defaults():
    settings = load_settings({})
    assert settings.n_trials == 200
    assert settings.n_startup_trials is None  # scaled to --n-trials by the study
    assert (settings.direction, settings.search_space, settings.warm_starts) == (
        "projected",
        "calibrated",
        True,
    )
    assert settings.time_budget is None
    assert settings.cache_weights is True
    assert settings.reset == "auto"
    assert settings.harmful_eval.source == "builtin:harmful" and settings.harmful_eval.split == "eval"


def test_priority_is_cli_then_environment_then_toml(tmp_path: Path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text(
        'n_trials = 5\nseed = 11\nstudy_name = "from-toml"\n[harmful_train]\nsource = "mine.txt"\n'
    )
    monkeypatch.setenv("ABLITERATE_SEED", "22")
    monkeypatch.setenv("ABLITERATE_STUDY_NAME", "from-env")
    settings = parse_settings(["--config", str(config), "--study-name", "from-cli"])
    assert settings.n_trials == 5  # toml over default
    assert settings.seed == 22  # environment over toml
    assert settings.study_name == "from-cli"  # command line over environment
    assert settings.harmful_train.source == "mine.txt"


def test_default_config_file_is_read_from_the_working_folder(tmp_path: Path, monkeypatch):
    (tmp_path / "config.toml").write_text("n_trials = 9\n")
    monkeypatch.chdir(tmp_path)
    assert parse_settings([]).n_trials == 9


def test_nested_environment_variables(monkeypatch):
    monkeypatch.setenv("ABLITERATE_HARMLESS_EVAL__SPLIT", "eval[:10]")
    assert load_settings({}).harmless_eval.split == "eval[:10]"


@pytest.mark.parametrize("value", ["float32,float16", "float32, float16", '["float32", "float16"]'])
def test_lists_in_the_environment_are_commas_or_json(value, monkeypatch):
    monkeypatch.setenv("ABLITERATE_DTYPES", value)
    assert load_settings({}).dtypes == ["float32", "float16"]


def test_a_broken_json_list_in_the_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("ABLITERATE_DTYPES", '["float32"')
    with pytest.raises(SettingsError, match=r"^ABLITERATE_DTYPES: not a valid JSON list; write it as a,b,c"):
        load_settings({})


def test_a_bad_value_is_named_where_it_was_set(tmp_path: Path, monkeypatch):
    config = tmp_path / "b.toml"
    config.write_text('n_trials = "two"\n')
    with pytest.raises(
        SettingsError, match=rf"^n_trials in {re.escape(str(config))}: Input should be a valid integer"
    ):
        load_settings({}, config)
    with pytest.raises(SettingsError, match=r"^--n-trials: .* \(got 'x'\)$"):  # the flag wins over the file
        load_settings({"n_trials": "x"}, config)
    config.write_text("[harmful_eval]\nsplit = 5\n")
    with pytest.raises(SettingsError, match=rf"^harmful_eval.split in {re.escape(str(config))}: "):
        load_settings({}, config)
    monkeypatch.setenv("ABLITERATE_N_TRIALS", "abc")
    with pytest.raises(SettingsError, match=r"^ABLITERATE_N_TRIALS: .* \(got 'abc'\)$"):
        load_settings({})
    with pytest.raises(SettingsError, match=r"^--gpus: .* \(got 'a'\)$"):  # not --gpus-0
        load_settings({"n_trials": 3, "workers": 2, "gpus": "a,b"})


def test_a_split_flag_keeps_the_source_from_the_config(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[harmful_eval]\nsource = "mine.jsonl"\ncolumn = "prompt"\n')
    settings = parse_settings(["--config", str(config), "--harmful-eval-split", "train[:20]"])
    assert (settings.harmful_eval.source, settings.harmful_eval.split, settings.harmful_eval.column) == (
        "mine.jsonl", "train[:20]", "prompt",
    )  # fmt: skip


def test_a_source_flag_keeps_the_default_split():
    settings = parse_settings(["--harmless-eval", "file.csv"])
    assert (settings.harmless_eval.source, settings.harmless_eval.split) == ("file.csv", "eval")


def test_lists_and_booleans_from_flags():
    settings = parse_settings(["--dtypes", "bfloat16, float32", "--cache-weights", "false", "--chat"])
    assert settings.dtypes == ["bfloat16", "float32"]
    assert settings.cache_weights is False and settings.chat is True
    assert parse_settings(["--warm-start-depths", "0.3, 0.9"]).warm_start_depths == [0.3, 0.9]


def test_every_field_has_a_flag():
    flags = {action.dest.split(".")[0] for action in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": "-1"}, "--batch-size: Input should be greater than or equal to 0 (got '-1')"),
        ({"max_response_length": "0"}, "--max-response-length: Input should be greater than 0 (got '0')"),
        ({"row_norm": "half"}, "--row-norm: Input should be 'none', 'pre' or 'full' (got 'half')"),
        ({"refusal_markers": " , "}, "--refusal-markers: give at least one marker (got ' , ')"),
        ({"time_budget": "soon"}, "--time-budget: write a duration as 90s, 30m, 2h or 1h30m (got 'soon')"),
        ({"time_budget": "0s"}, "--time-budget: Input should be greater than 0 (got 0.0)"),
        (
            {"warm_start_depths": "0.5,1.5"},
            "--warm-start-depths: depths are fractions of the model's depth, from 0 (first layer) to 1 (last) "
            "(got '0.5,1.5')",
        ),
        (
            {"warm_start_depths": ","},
            "--warm-start-depths: give at least one depth, or --warm-starts false for none (got ',')",
        ),
        (
            {"direction": "median"},
            "--direction: Input should be 'mean-difference', 'projected', 'search' or 'choose' (got 'median')",
        ),
    ],
)
def test_bad_values_are_one_line(values, message):
    with pytest.raises(SettingsError) as caught:
        load_settings(values)
    assert str(caught.value) == message
    assert caught.value.exit_code == 2


def test_compile_is_auto_unless_told_and_takes_flags_toml_booleans_and_the_environment(
    tmp_path: Path, monkeypatch
):
    assert load_settings({}).compile == "auto"
    assert parse_settings(["--compile"]).compile == "true"
    assert parse_settings(["--compile", "false"]).compile == "false"
    config = tmp_path / "config.toml"
    config.write_text("compile = true\n")
    assert load_settings({}, config).compile == "true"
    monkeypatch.setenv("ABLITERATE_COMPILE", "FALSE")
    assert load_settings({}, config).compile == "false"
    with pytest.raises(
        SettingsError, match=r"^--compile: Input should be 'auto', 'true' or 'false' \(got 'yes'\)$"
    ):
        parse_settings(["--compile", "yes"])


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("knee", True), ("min-refusals", True), ("min-kl", True), ("none", True), ("trial:12", True),
        ("max-kl:0.1", True), ("max-kl:2", True), ("max-kl:1e-3", True),
        ("best", False), ("trial:", False), ("trial:-1", False), ("trial:x", False),
        ("max-kl:", False), ("max-kl:0", False), ("max-kl:-0.1", False), ("max-kl:nan", False), ("max-kl:low", False),
    ],
)  # fmt: skip
def test_selection_forms(text, valid):
    try:
        Selection.parse(text)
    except ValueError:
        assert not valid
    else:
        assert valid


def test_broken_toml_is_one_line(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("n_trials = = 3\n")
    with pytest.raises(SettingsError, match=r"^cannot read .*config.toml"):
        load_settings({}, config)


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("ABLITERATE_N_TRIAL", "unknown environment variable ABLITERATE_N_TRIAL (did you mean ABLITERATE_N_TRIALS?)"),
        ("ABLITERATE_HARMFUL_EVAL_SPLIT",
         "unknown environment variable ABLITERATE_HARMFUL_EVAL_SPLIT (did you mean ABLITERATE_HARMFUL_EVAL__SPLIT?)"),
        ("ABLITERATE_THEME", "unknown environment variable ABLITERATE_THEME; see"),
    ],
)  # fmt: skip
def test_an_environment_variable_that_names_no_setting_is_refused(variable, message, monkeypatch):
    monkeypatch.setenv(variable, "3")
    with pytest.raises(SettingsError, match="^" + re.escape(message)):
        load_settings({})


def test_the_prefix_variables_that_are_not_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("ABLITERATE_TEST_POSTGRES_URL", "postgresql://x")
    monkeypatch.setenv("ABLITERATE_WORKER_NAME", "worker 0")
    assert load_settings({}).n_trials == 200


def test_a_prompt_set_in_toml_may_be_just_its_source(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('harmful_eval = "mine.jsonl"\n')
    assert load_settings({}, config).harmful_eval.model_dump() == {
        "source": "mine.jsonl",
        "split": "eval",
        "column": "text",
    }


def test_a_prompt_set_part_written_as_a_top_level_key_says_where_it_goes(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('harmful_eval_split = "eval[:10]"\n')
    with pytest.raises(SettingsError, match=r"\(write it as split = \.\.\. under \[harmful_eval\]\)"):
        load_settings({}, config)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("abliterate ")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("1m 30s", 90)])  # fmt: skip
def test_a_time_budget_is_a_duration(text, seconds):
    assert load_settings({"time_budget": text}).time_budget == seconds


def test_help_groups_every_option_by_topic_and_lists_choices():
    from abliterate.cli import HELP_GROUPS, build_parser

    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(Settings.model_fields), "each setting in exactly one --help group"
    text = build_parser().format_help()
    for title in HELP_GROUPS:
        assert f"\n{title}:\n" in text
    assert "--reset auto|gpu-cache|host-cache|disk|reload|adapter" in text
    assert "--direction mean-difference|projected|search|choose" in text
    # Defaults as a user writes them: `true`, not Python's `True`; a prompt set's column too.
    assert "(default: True)" not in text and "(default: true)" in text
    assert "column holding the prompt (default: text)" in " ".join(text.split())
    # A topic's options sit under its title: --n-trials under search, not under model.
    assert (
        text.index("\nsearch:\n")
        < text.index("  --n-trials")
        < text.index("\nweight reset between trials:\n")
    )
