"""Result quality on real models: the Pareto front of (refusals, KL), ours beside heretic-llm's.

The product is the model a study saves, so two tools (or two settings of ours) are compared by the
front a study finds: its hypervolume with refusals as a share of the harmful eval prompts and KL
clipped to 1, reference point (1, 1) (1 is a perfect front: no refusal at no KL), over several
seeds, at equal trial count and at equal wall time (the trials a study had finished when the
other tool's whole study was done, counted from each process's start, model load included).

Every run is its own process: `abliterate` through its command line (`--select none`, the study
read back from its SQLite file), heretic-llm 1.4.0 through `heretic_timed.py` (its own entry point,
configured by a `config.toml` we write; its journal read back). Both get the same model folder,
the built-in prompt sets (the eval sets cut to `--eval-prompts`), refusal markers, system prompt
(`You are a helpful assistant.`), response length, dtype and batch size. Runs go `--jobs` at a
time; on one GPU that shares the device between them, which stretches wall times alike.

    python benchmarks/quality.py run --model DIR --out runs.json --variant heretic \\
        --variant 'ours=' --variant 'wide=--search-space wide --direction mean-difference' --seeds 0,1,2
    python benchmarks/quality.py report runs.json [more.json ...] [--until-trial N]

A variant is `heretic`, `abliterix` (abliterix 1.12.2, a heretic derivative, configured the same way
through its TOML file; it pins optuna 4, so it may live in a Python of its own: `--abliterix-python`;
it counts refusals with its own ~80 phrases beside our markers, and a degenerate answer as one) or
`LABEL=FLAGS` (our flags on top of the shared ones). `report` merges the
runs of several files (an anchor's runs measured once and committed, beside new runs of ours).
A benchmark told to stop (SIGTERM, as `timeout` sends) gives every tool a Ctrl-C and writes the runs as
far as they got; `--resume` continues them in a later call (a 200-trial heretic study does not fit
one 10-minute GPU call). A resumed run has no wall time of its own, so it is left out of the
equal-time comparison. `report --until-trial N` reads every run as its first N trials, to compare
tools at the count the slowest reached when a call stopped it.
A variant run with `--refusal-judge both` (or `classifier`) records each trial's marker and
classifier counts; the report then gives the hypervolume by each judge's count alone, side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "abliterate" / "data" / "prompts"
SYSTEM_PROMPT = "You are a helpful assistant."


# -- the metric ----------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (both coordinates minimised), sorted by the first."""
    front: list[tuple[float, float]] = []
    for point in sorted(set(points)):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by `points` inside the unit square, reference (1, 1); coordinates clipped to 1."""
    area, previous_y = 0.0, 1.0
    for x, y in pareto([(min(x, 1.0), min(y, 1.0)) for x, y in points]):
        area += (1.0 - x) * (previous_y - y)
        previous_y = y
    return area


def scaled_points(run: dict, until_trial: int | None = None, until_seconds: float | None = None) -> list:
    """A run's trials as (refusal share, KL), optionally only the first trials or those done in time."""
    trials = run["trials"]
    if until_trial is not None:
        trials = [t for t in trials if t["index"] < until_trial]
    if until_seconds is not None:
        trials = [t for t in trials if t["done_seconds"] <= until_seconds]
    return [(t["refusals"] / run["eval_prompts"], t["kl"]) for t in trials]


# -- running the tools ---------------------------------------------------------------------------

_RUNNING: set[subprocess.Popen] = set()
_STOPPING = threading.Event()


def run_process(command: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run one tool's process to its end, its output appended to `log` (a resumed run keeps the
    earlier call's). Once the benchmark is told to stop (`stop_runs`), a process ending with an
    error is a run cut short, not a failure: its finished trials are read back all the same."""
    if _STOPPING.is_set():
        raise subprocess.CalledProcessError(-1, command)  # stopped before it began: nothing to read
    with log.open("a") as handle:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        )
        _RUNNING.add(process)
        try:
            code = process.wait()
        finally:
            _RUNNING.discard(process)
    if code != 0 and not _STOPPING.is_set():
        raise subprocess.CalledProcessError(code, command)


def stop_runs(signal_number: int, _frame) -> None:
    """On SIGTERM (a time limit's `timeout`): Ctrl-C to every tool, as a user would stop it. Both record
    the trials they finished and exit, and the runs are written as far as they got; `--resume`
    continues them."""
    _STOPPING.set()
    for process in list(_RUNNING):
        process.send_signal(signal.SIGINT)


def run_ours(label: str, flags: str, seed: int, args, folder: Path) -> dict:
    import optuna

    from abliterate.storage import folder_holds_study, folder_storage_url, open_storage

    command = [
        sys.executable, "-m", "abliterate", "--model", str(args.model), "--output", str(folder),
        "--n-trials", str(args.trials), "--seed", str(seed), "--select", "none",
        "--system-prompt", SYSTEM_PROMPT, "--max-response-length", str(args.max_response_length),
        "--batch-size", str(args.batch_size), "--dtypes", args.dtype, "--compile", "false",
        "--harmful-eval-split", f"eval[:{args.eval_prompts}]", "--harmless-eval-split", f"eval[:{args.eval_prompts}]",
        *shlex.split(flags),
    ]  # fmt: skip
    resumed = folder_holds_study(folder)
    started = time.time()
    run_process(command, folder.with_suffix(".log"))
    wall = time.time() - started
    storage = open_storage(folder_storage_url(folder))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = trial_records(study, started, lambda t: (t.values[0], t.values[1]))
    return {
        "tool": "abliterate", "label": label, "flags": flags, "seed": seed,
        "wall_seconds": None if resumed else wall, "resumed": resumed,
        "eval_prompts": study.user_attrs["eval_prompts"], "baseline_refusals": study.user_attrs["baseline_refusals"],
        "baseline_by_judge": study.user_attrs.get("baseline_refusals_by_judge"), "trials": trials,
    }  # fmt: skip


def anchor_startup(args) -> int:
    """The other tools' random start-up trials: heretic's default (15 of up to 40 trials, else 60)."""
    return args.heretic_startup if args.heretic_startup is not None else (15 if args.trials <= 40 else 60)


def load_journal_study(journal: Path, study_name: str):
    """A study another tool kept in an Optuna journal file."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=study_name, storage=storage)


def heretic_config(seed: int, args) -> str:
    from abliterate.judge import default_refusal_markers

    lines = [
        f'model = "{args.model}"', f'dtypes = ["{args.dtype}"]', 'device_map = "auto"',
        f"batch_size = {args.batch_size or 64}", f"max_response_length = {args.max_response_length}",
        'response_prefix = ""', f"n_trials = {args.trials}", f"n_startup_trials = {anchor_startup(args)}", f"seed = {seed}",
        'study_checkpoint_dir = "checkpoints"', f'system_prompt = "{SYSTEM_PROMPT}"',
        f"refusal_markers = {json.dumps(default_refusal_markers())}",
    ]  # fmt: skip
    prompt_sets = {
        "good_prompts": ("harmless_train", None), "bad_prompts": ("harmful_train", None),
        "good_evaluation_prompts": ("harmless_eval", args.eval_prompts),
        "bad_evaluation_prompts": ("harmful_eval", args.eval_prompts),
    }  # fmt: skip
    for table, (file, count) in prompt_sets.items():
        lines += ["", f"[{table}]", f'dataset = "{PROMPTS / (file + ".txt")}"']
        if count:
            lines.append(f'split = "[:{count}]"')
    return "\n".join(lines) + "\n"


def run_heretic(seed: int, args, folder: Path) -> dict:
    resumed = (folder / "checkpoints").exists()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(heretic_config(seed, args))
    started = time.time()
    command = [args.heretic_python, str(Path(__file__).with_name("heretic_timed.py")), "timings.jsonl"]
    # A checkpoint of an earlier call: heretic asks whether to continue it; the answer is yes.
    run_process(command + (["--continue"] if resumed else []), folder / "heretic.log", cwd=folder)
    wall = time.time() - started
    (journal,) = (folder / "checkpoints").glob("*.jsonl")
    study = load_journal_study(journal, "heretic")
    first = completed(study)[0]
    # heretic's objective values are its own scaled scores; the raw counts are user attributes.
    trials = trial_records(
        study, started, lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])
    )
    return {
        "tool": "heretic-llm 1.4.0", "label": "heretic", "flags": "", "seed": seed,
        "wall_seconds": None if resumed else wall, "resumed": resumed,
        "eval_prompts": int(first.user_attrs["n_bad_prompts"]),
        "baseline_refusals": int(first.user_attrs["base_refusals"]), "trials": trials,
    }  # fmt: skip


def abliterix_config(seed: int, args, folder: Path) -> str:
    """abliterix 1.12's settings (TOML) for the same model, prompts, markers, system prompt, response
    length, dtype, batch size, trials and start-up trials as the other tools; its defaults otherwise.
    It reads prompt sets only through `datasets`, so the four files are laid out as two local
    datasets of a `train` and a `test` split each."""
    from abliterate.judge import default_refusal_markers

    data = folder / "prompts"
    for kind in ("harmful", "harmless"):
        (data / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROMPTS / f"{kind}_train.txt", data / kind / "train.txt")
        shutil.copyfile(PROMPTS / f"{kind}_eval.txt", data / kind / "test.txt")

    def prompt_set(kind: str, split: str) -> str:
        return f'{{ dataset = "{data / kind}", split = "{split}", column = "text" }}'

    evaluated = f"test[:{args.eval_prompts}]"
    return "\n".join([
        f"seed = {seed}", "non_interactive = true", f'system_prompt = "{SYSTEM_PROMPT}"',
        f"benign_prompts = {prompt_set('harmless', 'train')}", f"target_prompts = {prompt_set('harmful', 'train')}",
        f"benign_eval_prompts = {prompt_set('harmless', evaluated)}",
        f"target_eval_prompts = {prompt_set('harmful', evaluated)}",
        "", "[model]", f'model_id = "{args.model}"', f'dtype_fallback_order = ["{args.dtype}"]', 'device_map = "auto"',
        "", "[inference]", f"batch_size = {args.batch_size or 64}", f"max_gen_tokens = {args.max_response_length}",
        "", "[optimization]", f"num_trials = {args.trials}", f"num_warmup_trials = {anchor_startup(args)}",
        f'checkpoint_dir = "{folder / "checkpoints"}"',
        # abliterix calls its refusal markers compliance markers; it adds ~80 phrases of its own.
        "", "[detection]", f"compliance_markers = {json.dumps(default_refusal_markers())}",
    ]) + "\n"  # fmt: skip


def run_abliterix(seed: int, args, folder: Path) -> dict:
    """One abliterix study, in the Python environment of `--abliterix-python` (it pins optuna 4)."""
    resumed = (folder / "checkpoints").exists()  # an unfinished checkpoint is continued unasked
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "abliterix.toml").write_text(abliterix_config(seed, args, folder))
    started = time.time()
    command = [
        args.abliterix_python,
        "-c",
        "from abliterix.cli import main; main()",
        "--config",
        "abliterix.toml",
    ]
    run_process(command, folder / "abliterix.log", cwd=folder)
    wall = time.time() - started
    (journal,) = (folder / "checkpoints").glob("*.jsonl")
    study = load_journal_study(journal, "abliterix")
    # The original model's count is only in its log.
    baseline = re.findall(r"Initial refusals: (\d+)/(\d+)", (folder / "abliterix.log").read_text())
    trials = trial_records(
        study, started, lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])
    )
    return {
        "tool": "abliterix 1.12.2", "label": "abliterix", "flags": "", "seed": seed,
        "wall_seconds": None if resumed else wall, "resumed": resumed, "eval_prompts": args.eval_prompts,
        "baseline_refusals": int(baseline[0][0]) if baseline else None, "trials": trials,
    }  # fmt: skip


def completed(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def trial_records(study, started: float, scores) -> list[dict]:
    """A study's finished trials in the order they finished; `scores(trial)` gives (refusals, KL)."""
    records = []
    for index, trial in enumerate(sorted(completed(study), key=lambda t: t.datetime_complete)):
        refusals, kl = scores(trial)
        records.append({
            "index": index, "refusals": int(refusals), "kl": float(kl),
            "done_seconds": trial.datetime_complete.timestamp() - started, "params": trial.params,
            **({"by_judge": trial.user_attrs["refusals_by_judge"]} if "refusals_by_judge" in trial.user_attrs else {}),
        })  # fmt: skip
    return records


def run(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    for variant in args.variant:
        label, _, flags = variant.partition("=")
        for seed in args.seeds:
            folder = work / f"{label}-seed{seed}"
            if not args.resume:
                shutil.rmtree(folder, ignore_errors=True)
                folder.with_suffix(".log").unlink(missing_ok=True)
            if label == "heretic":
                jobs.append(lambda seed=seed, folder=folder: run_heretic(seed, args, folder))
            elif label == "abliterix":
                jobs.append(lambda seed=seed, folder=folder: run_abliterix(seed, args, folder))
            else:
                jobs.append(lambda label=label, flags=flags, seed=seed, folder=folder: run_ours(label, flags, seed, args, folder))  # fmt: skip
    started = time.time()
    record = {
        "model": str(args.model), "trials": args.trials, "eval_prompts": args.eval_prompts,
        "max_response_length": args.max_response_length, "dtype": args.dtype, "jobs": args.jobs,
        "date": datetime.now().strftime("%Y-%m-%d"), "device": device_name(), "command": shlex.join(sys.argv),
        "runs": [],
    }  # fmt: skip
    signal.signal(signal.SIGTERM, stop_runs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(job) for job in jobs]):
            try:
                record["runs"].append(future.result())
            except Exception as error:
                if _STOPPING.is_set():
                    continue  # stopped before it finished a trial: --resume begins it again
                if not isinstance(error, subprocess.CalledProcessError):
                    raise
                print(f"a run failed: {shlex.join(map(str, error.cmd))}", file=sys.stderr)
                continue
            # Written after every run: a benchmark stopped part-way keeps what it finished.
            record["seconds"] = round(time.time() - started, 1)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(report([record]))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# -- the report ----------------------------------------------------------------------------------


def report(records: list[dict], until_trial: int | None = None) -> str:
    """Per variant and trial budget: hypervolume per seed, mean and spread; then at equal wall time; then
    fronts. `until_trial` reads every run as its first trials only, so that runs one tool could not
    finish in a call compare with the others at the same count."""
    runs = [
        {**run, "budget": record["trials"], "record": number}
        for number, record in enumerate(records)
        for run in record["runs"]
    ]
    if until_trial is not None:
        runs = [
            {**run, "budget": min(run["budget"], until_trial), "trials": run["trials"][:until_trial]}
            for run in runs
        ]
    lines = [f"- {r['date']}, {r['device']}, {r['model']}: {r['command']}" for r in records]
    lines += ["", "| variant | trials | hypervolume per seed | mean | spread (max - min) | wall s (mean) |"]
    lines.append("|---|---|---|---|---|---|")
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in sorted(runs, key=lambda run: run["seed"]):
        groups.setdefault((run["label"], run["budget"]), []).append(run)
    for (label, budget), group in sorted(groups.items()):
        volumes = [hypervolume(scaled_points(run)) for run in group]
        # A run stopped short of its budget says how far it got.
        shown = [
            f"{v:.3f}" + (f" ({len(run['trials'])} trials)" if len(run["trials"]) < budget else "")
            for v, run in zip(volumes, group, strict=True)
        ]
        walls = [run["wall_seconds"] for run in group if run.get("wall_seconds")]
        wall = f"{statistics.mean(walls):.0f}" if walls else "-"
        lines.append(
            f"| {label} | {budget} | {', '.join(shown)} | {statistics.mean(volumes):.3f} | "
            f"{max(volumes) - min(volumes):.3f} | {wall} |"
        )
    # Equal wall time: each of our runs cut where heretic's run of the same seed and budget ended, in
    # the same benchmark run only (runs sharing a GPU slow each other, alike only within one).
    # A run continued over several calls has no wall time of its own.
    anchors = {
        (run["record"], run["seed"], run["budget"]): run
        for run in runs
        if run["label"] == "heretic" and run.get("wall_seconds")
    }
    timed = [
        (
            label,
            budget,
            [
                (run, anchors[key])
                for run in group
                if (key := (run["record"], run["seed"], budget)) in anchors
            ],
        )
        for (label, budget), group in sorted(groups.items())
        if label != "heretic" and all(run.get("wall_seconds") for run in group)
    ]
    if any(pairs for *_, pairs in timed):
        lines += [
            "",
            "At equal wall time (each run cut when heretic's run of the same seed, trials and file ended):",
            "",
        ]
        lines += [
            "| variant | trials | trials done by then | hypervolume per seed | mean |",
            "|---|---|---|---|---|",
        ]
        for label, budget, pairs in timed:
            if not pairs:
                continue
            cut = [scaled_points(run, until_seconds=anchor["wall_seconds"]) for run, anchor in pairs]
            volumes = [hypervolume(points) for points in cut]
            lines.append(
                f"| {label} | {budget} | {', '.join(str(len(points)) for points in cut)} | "
                f"{', '.join(f'{v:.3f}' for v in volumes)} | {statistics.mean(volumes):.3f} |"
            )
    lines += judge_report(groups)
    lines += ["", "Fronts (refusals/eval prompts @ KL, KL up to 1):", ""]
    for run in sorted(runs, key=lambda run: (run["label"], run["budget"], run["seed"])):
        front = pareto([(t["refusals"], t["kl"]) for t in run["trials"]])
        shown = ", ".join(f"{r}@{kl:.3f}" for r, kl in front if kl <= 1.0)
        lines.append(
            f"- {run['label']} seed {run['seed']} ({len(run['trials'])} trials, "
            f"original {run['baseline_refusals']}/{run['eval_prompts']}): {shown}"
        )
    return "\n".join(lines)


def judge_report(groups: dict[tuple[str, int], list[dict]]) -> list[str]:
    """For variants judged by markers and a classifier: the hypervolume by each one's count alone
    (trials whose refusals were not counted left out), and the original model's counts."""
    judged = {
        key: group
        for key, group in groups.items()
        if any("by_judge" in t for r in group for t in r["trials"])
    }
    if not judged:
        return []
    lines = [
        "", "Refusal judges (each trial's refusals by the markers alone and by the classifier alone):", "",
        "| variant | trials | judge | original (per seed) | hypervolume per seed | mean |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for (label, budget), group in sorted(judged.items()):
        for judge in ("markers", "classifier"):
            volumes = [
                hypervolume(
                    [
                        (t["by_judge"][judge] / r["eval_prompts"], t["kl"])
                        for t in r["trials"]
                        if "by_judge" in t
                    ]
                )
                for r in group
            ]
            originals = ", ".join(str((r.get("baseline_by_judge") or {}).get(judge, "-")) for r in group)
            lines.append(
                f"| {label} | {budget} | {judge} | {originals} | {', '.join(f'{v:.3f}' for v in volumes)} | "
                f"{statistics.mean(volumes):.3f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run studies and write their trials as JSON")
    runner.add_argument("--model", required=True, type=Path, help="a local model folder")
    runner.add_argument("--out", required=True, help="JSON file for the runs")
    runner.add_argument("--workdir", default="/tmp/quality")
    runner.add_argument(
        "--variant", action="append", required=True, help="heretic, abliterix, or LABEL=OUR FLAGS"
    )
    runner.add_argument("--seeds", default="0,1,2", type=lambda text: [int(s) for s in text.split(",")])
    runner.add_argument("--trials", type=int, default=40)
    runner.add_argument(
        "--heretic-startup",
        type=int,
        help="heretic's and abliterix's start-up trials (15 up to 40 trials, else 60)",
    )
    runner.add_argument(
        "--heretic-python",
        default=sys.executable,
        help="the Python that has heretic-llm 1.4.0 (default: this one)",
    )
    runner.add_argument(
        "--abliterix-python",
        default=sys.executable,
        help="the Python that has abliterix 1.12.2 (default: this one)",
    )
    runner.add_argument("--eval-prompts", type=int, default=100)
    runner.add_argument("--max-response-length", type=int, default=64)
    runner.add_argument("--batch-size", type=int, default=64)
    runner.add_argument("--dtype", default="bfloat16")
    runner.add_argument("--jobs", type=int, default=1)
    runner.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs of an earlier call in --workdir (stopped by its time limit) instead of starting afresh",
    )
    reporter = commands.add_parser("report", help="tables from JSON files of runs")
    reporter.add_argument("files", nargs="+")
    reporter.add_argument("--until-trial", type=int, help="read every run as its first N trials only")
    args = parser.parse_args()
    if args.command == "run":
        args.model = args.model.resolve()
        run(args)
    else:
        print(report([json.loads(Path(file).read_text()) for file in args.files], args.until_trial))


if __name__ == "__main__":
    main()
