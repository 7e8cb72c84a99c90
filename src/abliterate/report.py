"""The study's report: `pareto.png` and a self-contained `report.html` in the output folder.

The plot shows every trial's refusals against its KL, the Pareto front, the original model, the
front's knee and the saved trial. The page adds the front as a table, the saved trial's parameters
and per-layer weights, the time per trial, and sample answers of the original and the saved model
side by side. Everything comes from the study and `samples.json` (written when a model is saved),
so `abliterate report --output DIR` rebuilds both files without loading a model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from abliterate.export import write_file_atomically
from abliterate.select import knee, pareto_front
from abliterate.space import kernels_of
from abliterate.storage import StudyData
from abliterate.terminal import JUDGE_COLUMNS, direction_cell, judge_cells, judged_by_classifier

REPORT_FILE = "report.html"
PLOT_FILE = "pareto.png"
SAMPLES_FILE = "samples.json"


@dataclass(frozen=True)
class Sample:
    """One eval prompt's answers by the original and the saved model."""

    kind: str  # "harmful" or "harmless"
    prompt: str
    original: str
    saved: str


def save_samples(samples: list[Sample], output: Path) -> None:
    write_file_atomically(output / SAMPLES_FILE, json.dumps([asdict(s) for s in samples], indent=1).encode())


def load_samples(output: Path) -> list[Sample]:
    try:
        return [Sample(**item) for item in json.loads((output / SAMPLES_FILE).read_text("utf-8"))]
    except (OSError, ValueError, TypeError):
        return []


def write_report(
    study: optuna.Study, output: Path, saved: FrozenTrial | None, samples: list[Sample]
) -> list[Path]:
    """Write pareto.png (when matplotlib is installed) and report.html; returns what was written."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = pareto_front(study)
    written = []
    plot = pareto_plot(study, trials, front, saved)
    if plot is not None:
        write_file_atomically(output / PLOT_FILE, plot)
        written.append(output / PLOT_FILE)
    page = report_page(study, trials, front, saved, samples, plot)
    write_file_atomically(output / REPORT_FILE, page.encode("utf-8"))
    written.append(output / REPORT_FILE)
    return written


def pareto_plot(
    study: optuna.Study, trials: list[FrozenTrial], front: list[FrozenTrial], saved: FrozenTrial | None
) -> bytes | None:
    """The refusals-KL plane as PNG bytes; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        from matplotlib import pyplot
    except ImportError:
        return None
    eval_prompts = StudyData(study).eval_prompts or 1
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    try:
        axes.scatter(
            [t.values[1] for t in trials], [t.values[0] for t in trials], s=14, color="#b0b0b0", label="trial"
        )
        if front:
            axes.step(
                [t.values[1] for t in front], [t.values[0] for t in front], where="post", color="#1f77b4",
                marker="o", markersize=4, label="Pareto front",
            )  # fmt: skip
            point = knee(front)
            axes.scatter([point.values[1]], [point.values[0]], s=90, facecolors="none", edgecolors="#2ca02c",
                         linewidths=2, label=f"knee (trial {point.number})")  # fmt: skip
        baseline = StudyData(study).baseline_refusals
        if baseline is not None:
            axes.scatter([0], [baseline], marker="s", color="black", label="original model")
        if saved is not None:
            axes.scatter([saved.values[1]], [saved.values[0]], marker="*", s=180, color="#d62728",
                         label=f"saved (trial {saved.number})")  # fmt: skip
        axes.set_xlabel("KL divergence on harmless prompts (lower: closer to the original)")
        axes.set_ylabel(f"refusals of {eval_prompts} harmful prompts")
        kls = [t.values[1] for t in trials]
        if kls and max(kls) > 10 * max(statistics.median(kls), 1e-3):
            axes.set_xscale("symlog", linthresh=0.01)  # a few broken trials would squash the front
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        pyplot.close(figure)


def report_page(
    study: optuna.Study,
    trials: list[FrozenTrial],
    front: list[FrozenTrial],
    saved: FrozenTrial | None,
    samples: list[Sample],
    plot: bytes | None,
) -> str:
    stored = StudyData(study)
    eval_prompts, baseline = stored.eval_prompts, stored.baseline_refusals
    out_of = f"/{eval_prompts}" if eval_prompts else ""
    knee_trial = knee(front) if front else None
    parts = [
        f"<h1>abliterate: {_e(study.study_name)}</h1>",
        f"<p>Model <code>{_e(stored.model or '?')}</code>; {len(trials)} finished trials; "
        f"the original model refuses {baseline}{out_of} harmful eval prompts.</p>",
    ]
    if plot is not None:
        parts.append(
            f'<img alt="Pareto front" src="data:image/png;base64,{base64.b64encode(plot).decode()}">'
        )
    else:
        parts.append("<p>(pareto.png: install matplotlib for the plot)</p>")
    judged = judged_by_classifier(front)
    rows = [
        [
            str(t.number)
            + (" (saved)" if saved is not None and t.number == saved.number else "")
            + (" (knee)" if knee_trial is not None and t.number == knee_trial.number else ""),
            f"{int(t.values[0])}{out_of}",
            *(judge_cells(t.user_attrs.get("refusals_by_judge", {})) if judged else ()),
            f"{t.values[1]:.4f}",
            direction_cell(t.params),
        ]
        for t in front
    ]
    if baseline is not None:
        original_cells = judge_cells(stored.baseline_by_judge) if judged else []
        rows.append(["original model", f"{baseline}{out_of}", *original_cells, "0", "-"])
    columns = ["trial", "refusals", *(JUDGE_COLUMNS if judged else ()), "KL", "direction"]
    parts += ["<h2>Pareto front</h2>", _table(columns, rows)]
    if saved is not None:
        parts += [
            f"<h2>Saved trial {saved.number}</h2>",
            _table(["parameter", "value"], _parameter_rows(saved)),
        ]
        directions = StudyData(study).directions
        if directions is not None:
            layers = directions.shape[-2]
            kernels = kernels_of(saved.params)
            rows = [[str(layer), *(f"{kernel.weights(layers)[layer]:.3f}" for kernel in kernels.values())]
                    for layer in range(layers)]  # fmt: skip
            parts += ["<h3>Ablation weight per layer</h3>", _table(["layer", *kernels], rows)]
    seconds = [
        sum(t.user_attrs["seconds"].values()) for t in trials if isinstance(t.user_attrs.get("seconds"), dict)
    ]
    if seconds:
        parts.append(
            f"<h2>Time per trial</h2><p>median {statistics.median(seconds):.2f} s, "
            f"mean {statistics.mean(seconds):.2f} s over {len(seconds)} trials</p>"
        )
    if samples:
        parts += ["<h2>Sample answers</h2>", _table(
            ["prompt", "original", "saved"],
            [[f"<b>{_e(s.kind)}</b>: {_e(s.prompt)}", _e(s.original), _e(s.saved)] for s in samples],
            escape=False,
        )]  # fmt: skip
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;text-align:left}img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>abliterate report: '
        f"{_e(study.study_name)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _parameter_rows(trial: FrozenTrial) -> list[list[str]]:
    return [[_e(name), _e(f"{value:.4g}" if isinstance(value, float) else str(value))]
            for name, value in sorted(trial.params.items())]  # fmt: skip


def _table(header: list[str], rows: list[list[str]], escape: bool = True) -> str:
    cells = _e if escape else str
    head = "".join(f"<th>{_e(column)}</th>" for column in header)
    body = "".join("<tr>" + "".join(f"<td>{cells(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(str(text))
