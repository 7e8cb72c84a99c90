"""The recipe: settings -> model + prompts -> directions -> study -> export.

Each step is a component from its own module; this file only wires them in order and reports
progress. `run(settings)` is what the command line calls, and it can be called from Python too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import torch
import transformers
from rich.console import Console
from rich.markup import escape

from abliterate import workers
from abliterate.chat import Chat, chat_loop
from abliterate.compiled import (
    COMPILE_CACHE,
    count_baseline,
    keep_compiled_code_in,
    pin_decoder,
    use_compiled_generation,
)
from abliterate.components import EditableModel, find_components
from abliterate.directions import capture_residuals, refusal_directions
from abliterate.errors import UserError
from abliterate.evaluate import (
    Evaluator,
    eval_batch_size,
    load_for_scoring,
    refusal_judge,
)
from abliterate.export import (
    MARKER,
    ModelCard,
    check_upload,
    clean_partials,
    prepare_output,
    save_edited_checkpoint,
    save_model,
    upload,
)
from abliterate.judge import RefusalJudge
from abliterate.model import (
    DEMO_MODEL_NAME,
    ChatModel,
    gguf_file_of,
    local_folder,
    model_name,
)
from abliterate.prompts import load_prompts
from abliterate.report import Sample, save_samples, write_report
from abliterate.reset import AdapterEditor, Edit, Editor, choose_strategy, describe, make_editor
from abliterate.select import finished_trial, pareto_front, select_trial
from abliterate.settings import Selection, Settings
from abliterate.space import SearchSpace, edits_from_params
from abliterate.storage import (
    JOURNAL_FILE,
    SQLITE_FILE,
    MissingStorage,
    StudyData,
    fail_stale_trials,
    folder_holds_study,
    folder_storage_url,
    open_storage,
)
from abliterate.study import (
    Objective,
    finished_trials,
    open_study,
    pin_scoring,
    plan_warm_starts,
    run_study,
    startup_trials,
    startup_trials_in_time,
)
from abliterate.terminal import (
    ask_selection,
    front_table,
    judge_counts,
    mean_trial_seconds,
    progress_bars,
    report_failed_trials,
    seconds_per_finished_trial,
)


@dataclass
class Session:
    """Everything a study needs, loaded once."""

    settings: Settings
    model: ChatModel
    editable: EditableModel
    study: optuna.Study
    directions: torch.Tensor
    evaluator: Evaluator
    editor: Editor
    output: Path
    deadline: float | None  # time.monotonic() after which no trial starts (--time-budget)


def quiet_libraries() -> None:
    """Our own progress bars and lines say what happens; the libraries' logs would repeat it."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernel notes on every 4-bit load
    # Inductor's advice for float32 matrix products; the compiled decoder runs in the model's dtype.
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")


def run(settings: Settings, console: Console | None = None, command: str | None = None) -> Path | None:
    """Run (or resume) the whole pipeline; returns the saved model folder, if one was saved."""
    # Lines as long as they are (log files stay greppable), numbers not coloured by guesswork.
    console = console or Console(stderr=True, soft_wrap=True, highlight=False)
    quiet_libraries()
    if settings.push_to_hub:
        check_upload(settings.push_to_hub)
    # The output folder is checked before the model loads: a mistake there costs no waiting.
    output = study_location(settings)[0]
    created = [folder for folder in (output, *output.parents) if not folder.exists()]
    found_empty = output.is_dir() and not any(output.iterdir())
    prepare_output(output, None if gguf_file_of(settings.model) else local_folder(settings.model))
    try:
        return _run_in(output, settings, console, command)
    except BaseException:
        if created or found_empty:
            _remove_if_unused(output, created)
        raise


def _run_in(output: Path, settings: Settings, console: Console, command: str | None) -> Path | None:
    storage_url, study_name = study_location(settings)[1:]
    check_before_loading(settings, output, storage_url, study_name)
    picking = settings.selection is not None and settings.selection.rule == "trial"  # no new trials
    if settings.workers > 1 and not picking:
        console.print(f"starting {settings.workers} workers on study {study_name!r} in {storage_url}")
        if not torch.cuda.is_available():
            console.print(f"no GPU is visible: the {settings.workers} workers share the CPU")
        workers.launch(settings, storage_url, study_name, output, note=console.print)
    session = prepare(settings, console)
    if settings.workers == 1 and not picking:  # workers ran the search, and spent any --time-budget
        search(session, console)
    trial, how = choose(session, console)
    if trial is None:
        console.print(f"--select none: no model saved; the study is kept in {storage_url}")
        _report(session.study, output, None, [], console)
        return None
    saved = export(session, trial, command or shlex.join(["abliterate", *sys.argv[1:]]))
    console.print(f"saved trial {trial.number}, chosen by --select {how}, to [bold]{saved}[/bold]")
    samples = sample_answers(session, trial)
    save_samples(samples, output)
    for sample in samples[:3]:
        console.print(f"\n[bold]{sample.kind} prompt[/bold]: {escape(sample.prompt)}")
        console.print(f"  original: {escape(sample.original)}\n  saved:    {escape(sample.saved)}")
    _report(session.study, output, trial, samples, console)
    if settings.push_to_hub:
        console.print(f"uploaded to {upload(saved, settings.push_to_hub, settings.hub_private)}")
    if settings.chat:
        session.model.compiled_generation = False  # every turn has a new length: each would recompile

        def edited() -> ChatModel:
            apply_trial(session, trial)
            return session.model

        def original() -> ChatModel:  # the same weights, back as they were: no second model in memory
            session.editor.reset()
            return session.model

        chat_loop(Chat(edited, original, Console(highlight=False)))  # replies on stdout
    return saved


def check_before_loading(settings: Settings, output: Path, storage_url: str, study_name: str) -> None:
    """Mistakes the study's storage shows without the model: another model's study in the output
    folder (a run there would add a second study and replace its saved model), and a trial to pick
    (`--select trial:N`) that the study does not hold."""
    if settings.storage is None and settings.study_name is None and folder_holds_study(output):
        names = [summary.study_name for summary in optuna.get_all_study_summaries(open_storage(storage_url))]
        if names and study_name not in names:
            raise UserError(
                f"--output {output} holds the study {names[0]!r} of another model; choose another --output "
                "(or pass --study-name to keep a second study in it)"
            )
    selection = settings.selection
    if selection is not None and selection.rule == "trial":
        try:
            study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url, existing=True))
        except (KeyError, MissingStorage):
            raise UserError(
                f"--select trial:{selection.trial_number}: there is no study {study_name!r} in {storage_url} "
                "yet; run it first"
            ) from None
        finished_trial(study, selection.trial_number)  # or one line naming the front


SAMPLE_PROMPTS = {"harmful": 2, "harmless": 1}
SAMPLE_TOKENS = 96


def sample_answers(session: Session, trial) -> list[Sample]:
    """The first harmful and harmless eval prompts, answered by the original and by the saved trial."""
    model, evaluator = session.model, session.evaluator
    prompts = [
        (kind, prompt)
        for kind, count in SAMPLE_PROMPTS.items()
        for prompt in (evaluator.harmful_prompts if kind == "harmful" else evaluator.harmless_prompts)[:count]
    ]
    compiled, model.compiled_generation = model.compiled_generation, False  # one-off lengths: no recompiles

    def answers() -> list[str]:
        batch = model.tokenizer(
            [model.format(prompt) for _, prompt in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(model.input_device)
        return [answer.strip() for answer in model.generate(dict(batch), SAMPLE_TOKENS)]

    try:
        session.editor.reset()
        original = answers()
        apply_trial(session, trial)
        saved = answers()
    finally:
        session.editor.reset()
        model.compiled_generation = compiled
    return [
        Sample(kind, prompt, before, after)
        for (kind, prompt), before, after in zip(prompts, original, saved, strict=True)
    ]


def _report(study: optuna.Study, output: Path, trial, samples: list[Sample], console: Console) -> None:
    written = write_report(study, output, trial, samples)
    console.print(f"report: {' and '.join(str(path) for path in reversed(written))}")


def _remove_if_unused(output: Path, created: list[Path]) -> None:
    """A run that stopped before its first trial leaves the output as it found it: absent, or
    empty. `created` are the folders this run made (the output and its parents, innermost first),
    none when the output was there, empty. Anything else found in it (a saved model, a `--storage`
    file placed there) keeps everything."""
    if any(not _made_by_a_run(entry.name) for entry in output.iterdir()):
        return
    if folder_holds_study(output):
        try:
            summaries = optuna.get_all_study_summaries(open_storage(folder_storage_url(output)))
        except Exception:  # a file the storage cannot read: keep it for the user to look at
            return
        # In a folder that was there before, a study even without trials may be another run's,
        # begun beside this one.
        if any(summary.n_trials for summary in summaries) or (summaries and not created):
            return
    if not created:
        for entry in output.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return
    shutil.rmtree(output, ignore_errors=True)
    for parent in created[1:]:
        with contextlib.suppress(OSError):  # another run's folder appeared in it meanwhile
            parent.rmdir()


def _made_by_a_run(name: str) -> bool:
    """Whether an entry of an output folder is one a run makes before its first trial."""
    return name in (MARKER, COMPILE_CACHE) or name.startswith((JOURNAL_FILE, SQLITE_FILE))


def prepare(
    settings: Settings, console: Console, on_study_open: Callable[[optuna.Study], None] | None = None
) -> Session:
    """Load the model, open (or resume) the study, find the directions and count the baseline.

    `on_study_open` runs once the model has loaded and the study is open and its scoring checked,
    before the directions and the baseline: the workers of `--workers` use it to say they loaded,
    or to wait for the worker that computes those (workers.py).
    """
    # The time budget counts from here: the model's load and the directions are part of what it buys.
    deadline = time.monotonic() + settings.time_budget if settings.time_budget else None
    prompts = {
        name: load_prompts(getattr(settings, name), "--" + name.replace("_", "-"))
        for name in ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")
    }
    console.print(f"loading {settings.model or 'the built-in demo model'}")
    model = load_for_scoring(settings.model, settings)
    judge = refusal_judge(settings, model)
    if model.thinking_markers:
        console.print(
            f"thinking blocks ({' ... '.join(model.thinking_markers)}) are skipped when counting refusals"
        )
    if settings.system_prompt and not model.template_takes_system_prompt:
        console.print("the chat template takes no system message: --system-prompt is put before each prompt")
    editable = find_components(model.model)
    offloaded = editable.offloaded()
    if offloaded:
        raise UserError(
            f"{len(offloaded)} of {model.name}'s editable matrices ({offloaded[0]}, ...) are offloaded to the "
            f"CPU or disk by --device-map {settings.device_map}, where edits cannot reach them; make the model "
            "fit its devices (--quantization bnb-4bit, more GPUs) or run it all on the CPU (--device-map cpu)"
        )
    output, storage_url, study_name = study_location(settings)
    prepare_output(output, model.folder)  # again: a hub model's folder is known only now
    clean_partials(output)
    study = open_study(
        open_storage(storage_url),
        study_name,
        settings.seed,
        startup_trials(settings.n_trials, settings.n_startup_trials),
        model.source,
    )
    pin_scoring(study, scoring(settings, model, prompts, judge))
    if on_study_open is not None:
        on_study_open(study)

    batch_size = eval_batch_size(settings, model, prompts["harmful_eval"])
    console.print(
        f"{model.name}: {editable.num_layers} layers, dtype {str(model.dtype).removeprefix('torch.')}, batch size {batch_size}"
    )
    directions = _directions(study, model, editable, prompts, batch_size, settings.direction, console)

    choice = choose_strategy(settings.reset, settings.cache_weights, editable)
    console.print(describe(choice, editable, model.model))
    # Before the baseline is counted: the adapter's hooks must be in the forward pass the decoder
    # compiles then. Making an editor edits nothing.
    editor = make_editor(
        choice.strategy,
        model.model,
        editable,
        model.folder,
        reload=lambda: _reload(model, settings.trust_remote_code),
        verify=settings.verify_restore,
    )
    # Before the evaluator: the baseline is counted by the same decoder as the trials.
    if use_compiled_generation(settings.compile, study, model):
        keep_compiled_code_in(output)
        console.print(
            f"--compile {settings.compile}: the first generation compiles the decoder (seconds to a minute)"
        )
    stored = StudyData(study)
    counted = stored.baseline_refusals is not None
    if counted:  # a resume: a decoder other than the study's is refused before the evaluation starts
        pin_decoder(study, model)

    # The original log-probabilities must be taken before any edit: build the evaluator first.
    evaluator = Evaluator(
        model,
        prompts["harmful_eval"],
        prompts["harmless_eval"],
        judge,
        batch_size,
        settings.max_response_length,
        settings.kl_tokens,
    )
    if not counted:
        baseline = count_baseline(evaluator, settings.compile, console)
        pin_decoder(study, model)  # only now: `auto` may have dropped a decoder that failed to compile
        stored.record_baseline(len(prompts["harmful_eval"]), baseline.total, baseline.by_judge())
    console.print(
        f"original model: {stored.baseline_refusals}/{len(prompts['harmful_eval'])} refusals"
        + judge_counts(stored.baseline_by_judge)
    )

    return Session(settings, model, editable, study, directions, evaluator, editor, output, deadline)


def scoring(
    settings: Settings, model: ChatModel, prompts: dict[str, list[str]], judge: RefusalJudge
) -> dict[str, str]:
    """What a trial's scores depend on, beyond its parameters (see `pin_scoring`)."""

    def digest(items: list[str]) -> str:
        return f"{len(items)} items, sha256 {hashlib.sha256(chr(10).join(items).encode()).hexdigest()[:12]}"

    return {
        "--harmful-eval": digest(prompts["harmful_eval"]),
        "--harmless-eval": digest(prompts["harmless_eval"]),
        "--refusal-markers": digest(list(judge.markers.markers)),
        "--refusal-judge": judge.mode,
        **({"--refusal-classifier": judge.classifier.source} if judge.classifier else {}),
        "--max-response-length": str(settings.max_response_length),
        "--kl-tokens": str(settings.kl_tokens),
        "--system-prompt": settings.system_prompt or "",
        "--enable-thinking": str(settings.enable_thinking).lower(),
        "chat template": digest([str(model.tokenizer.chat_template)]),
        "--row-norm": settings.row_norm,
        "--direction-scope": settings.direction_scope,
        "--direction": settings.direction,
        "--quantization": settings.quantization,
        # "--compile" too (compiled kernels round differently), pinned once the baseline has been counted.
    }


def study_location(settings: Settings) -> tuple[Path, str, str]:
    """The output folder, the storage URL and the study name, all known before the model loads."""
    name = model_name(settings.model)
    output = settings.output or Path("abliterated") / name
    storage_url = settings.storage or folder_storage_url(output)
    return output, storage_url, settings.study_name or name


def _directions(
    study, model: ChatModel, editable, prompts, batch_size: int, method: str, console: Console
) -> torch.Tensor:
    """The refusal direction basis (see `directions.py`), computed once per study and kept in it, so
    resumes and workers share it."""
    stored = StudyData(study)
    directions = stored.directions
    if directions is None:
        residuals = {}
        with progress_bars(console) as progress:
            for name in ("harmful_train", "harmless_train"):
                task = progress.add_task(f"residuals: {name.replace('_', ' ')}", total=len(prompts[name]))
                batches = model.encode(prompts[name], batch_size)
                residuals[name] = capture_residuals(
                    model, batches, editable.layers, on_batch=lambda n, task=task: progress.advance(task, n)
                )
        computed = refusal_directions(residuals["harmful_train"], residuals["harmless_train"], method)
        # A worker that started at the same time may have stored its directions first: use those.
        directions = stored.directions
        if directions is None:
            stored.directions = directions = computed
    digest = hashlib.sha256(directions.numpy().tobytes()).hexdigest()[:16]
    console.print(f"refusal directions: {directions.shape[-2]} layers, sha256 {digest}")
    return directions


def _reload(model: ChatModel, trust_remote_code: bool) -> torch.nn.Module:
    source, options = model.pretrained_source()
    return transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=model.dtype, device_map="cpu", trust_remote_code=trust_remote_code, **options
    )


def search(session: Session, console: Console) -> None:
    settings = session.settings
    # A killed run's last trial is failed now, not waited for (by its process id; one killed before
    # its first heartbeat in an SQL storage, after the grace period).
    fail_stale_trials(session.study)
    report_failed_trials(session.study, console)
    done = len(finished_trials(session.study))
    stored = StudyData(session.study)
    asked = stored.n_trials
    if asked is not None and settings.n_trials > asked and done:
        console.print(
            f"growing study {session.study.study_name!r} from {asked} to {settings.n_trials} trials (--n-trials)"
        )
    if asked != settings.n_trials:
        stored.n_trials = settings.n_trials
    if done >= settings.n_trials:
        console.print(
            f"study {session.study.study_name!r} already holds {done} finished trials "
            f"(--n-trials {settings.n_trials}): no new trials"
        )
    elif done:
        console.print(
            f"resuming study {session.study.study_name!r}: {done} of {settings.n_trials} trials finished"
        )
    space = SearchSpace(
        session.editable.num_layers,
        direction_scope=settings.direction_scope,
        ranges=settings.search_space,
        projection=settings.direction if settings.direction in ("search", "choose") else "fixed",
        warm_start_depths=tuple(settings.warm_start_depths),
    )
    plan_warm_starts(session.study, space.warm_starts() if settings.warm_starts else [])
    eval_prompts = stored.eval_prompts

    def report(trial: optuna.Trial, scores) -> None:
        if scores.refusals_counted:
            console.print(
                f"trial {trial.number:>4}: refusals {scores.refusals:>3}/{eval_prompts}, KL {scores.kl:.4f}"
                + judge_counts(scores.refusals_by_judge)
            )
        else:
            console.print(
                f"trial {trial.number:>4}: KL {scores.kl:.4f}, refusals not counted "
                "(a trial without refusals has no more KL)"
            )

    objective = Objective(
        session.editor,
        session.evaluator,
        session.directions,
        space,
        settings.row_norm,
        report,
        baseline_refusals=stored.baseline_refusals,
        skip_dominated=settings.skip_dominated,
    )
    with progress_bars(console) as progress:
        task = progress.add_task(
            "study",
            total=settings.n_trials,
            completed=min(done, settings.n_trials),
            seconds_per_trial=mean_trial_seconds(finished_trials(session.study)),
        )
        # One trial: the harmless prompts' forward pass, then the harmful prompts' generation.
        trial_task = progress.add_task("trial", total=session.evaluator.prompt_count)
        session.evaluator.on_batch = lambda prompts: progress.advance(trial_task, prompts)

        searching_since = datetime.now()  # the trials' own clock (Optuna's local, naive times)

        def advance(study: optuna.Study, trial) -> None:
            if trial.state == optuna.trial.TrialState.FAIL and "fail_reason" in trial.user_attrs:
                console.print(f"trial {trial.number:>4}: failed, {trial.user_attrs['fail_reason']}")
            finished = finished_trials(study)
            seconds_per_trial = seconds_per_finished_trial(finished, searching_since)
            progress.update(
                task, completed=min(len(finished), settings.n_trials), seconds_per_trial=seconds_per_trial
            )
            progress.reset(trial_task)
            if session.deadline is not None and settings.n_startup_trials is None and seconds_per_trial:
                study.sampler.n_startup_trials = startup_trials_in_time(
                    settings.n_trials, len(finished), session.deadline - time.monotonic(), seconds_per_trial
                )

        try:
            run_study(
                session.study, objective, settings.n_trials, callbacks=[advance], deadline=session.deadline
            )
        finally:
            session.evaluator.on_batch = None
            progress.remove_task(trial_task)  # an empty per-trial bar would stay on screen
    finished = len(finished_trials(session.study))
    if session.deadline is not None and finished < settings.n_trials and time.monotonic() >= session.deadline:
        console.print(f"--time-budget spent: {finished} of {settings.n_trials} trials finished")


def choose(session: Session, console: Console) -> tuple[optuna.trial.FrozenTrial | None, Selection]:
    """The trial to save (None for `--select none`) and the rule that picked it."""
    front = pareto_front(session.study)
    console.print(front_table(front, StudyData(session.study).eval_prompts))
    selection = session.settings.selection
    if selection is None:
        selection = ask_selection(front) if sys.stdin.isatty() else Selection("knee")
    return select_trial(session.study, selection), selection


def trial_edits(session: Session, trial) -> list[Edit]:
    return edits_from_params(trial.params, session.directions)


def apply_trial(session: Session, trial) -> None:
    session.editor.reset()
    session.editor.apply(trial_edits(session, trial), session.settings.row_norm)


def counted_refusals(session: Session, trial) -> int:
    """A trial's refusal count. The study skipped counting those of a trial that could not reach the
    front (`--skip-dominated`) and stored the original model's count in their place: chosen by
    `--select trial:N`, such a trial's refusals are counted now, for the model card."""
    if trial.user_attrs.get("refusals_counted", True):
        return int(trial.values[0])
    apply_trial(session, trial)
    try:
        return session.evaluator.count_refusals()
    finally:
        session.editor.reset()


def export(session: Session, trial, command: str) -> Path:
    stored = StudyData(session.study)
    card = ModelCard(
        source_model=session.model.source if session.model.name != DEMO_MODEL_NAME else DEMO_MODEL_NAME,
        trial=trial.number,
        params=dict(trial.params),
        refusals=counted_refusals(session, trial),
        eval_prompts=stored.eval_prompts,
        baseline_refusals=stored.baseline_refusals,
        kl=float(trial.values[1]),
        command=command,
        hub_id=session.model.hub_id,
        refusal_judge=session.settings.refusal_judge,
        kl_tokens=session.settings.kl_tokens,
    )
    if isinstance(session.editor, AdapterEditor):
        return _export_merged(session, trial, card)
    apply_trial(session, trial)
    try:
        return save_model(session.model.model, session.model.tokenizer_to_save, session.output, card)
    finally:
        session.editor.reset()


def _export_merged(session: Session, trial, card: ModelCard) -> Path:
    """Adapter runs never touch the weights: the edit is merged into the model's own files."""
    assert session.model.folder is not None, "make_editor refuses adapter runs without the model's files"
    return save_edited_checkpoint(
        session.model.folder,
        session.editable,
        trial_edits(session, trial),
        session.settings.row_norm,
        session.model.tokenizer_to_save,
        session.output,
        card,
        session.settings.trust_remote_code,
    )
