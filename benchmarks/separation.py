"""Does a layer's separation of harmful from harmless prompts say where the good directions are?

Many abliteration recipes take the refusal direction from the layer where the harmful and harmless
means lie furthest apart. This prints, per layer, how well that layer's direction separates the
two prompt sets (Cohen's d of the residuals projected on it: the difference of the means over the
pooled standard deviation, for the mean-difference and the projected direction) and, given the
JSON files of `quality.py` runs on the same model, how many of our trials whose direction came from
that depth were good (at most `--good-refusals` of the eval prompts refused, at KL at most
`--good-kl`), beside how many looked there.

    PYTHONPATH=src python benchmarks/separation.py --model /tmp/gorg/model \\
        --runs benchmarks/results/quality/gemma3-270m-refuser-h200-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from abliterate.components import find_components
from abliterate.directions import capture_residuals, refusal_directions
from abliterate.model import load_chat_model

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "data" / "prompts"


def cohens_d(harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor) -> float:
    """How far apart the two sets lie along `direction`, in pooled standard deviations."""
    along_harmful, along_harmless = harmful @ direction, harmless @ direction
    pooled = ((along_harmful.var() + along_harmless.var()) / 2).sqrt()
    return float((along_harmful.mean() - along_harmless.mean()) / pooled)


def separation(harmful: torch.Tensor, harmless: torch.Tensor) -> list[tuple[float, float]]:
    """Per layer, Cohen's d along the study's mean-difference and projected directions, from
    (prompts, layers, hidden) residuals."""
    plain, projected = (
        refusal_directions(harmful, harmless, method)[0] for method in ("mean-difference", "projected")
    )
    rows = []
    for layer in range(harmful.shape[1]):
        hurt, calm = harmful[:, layer].float(), harmless[:, layer].float()
        rows.append((cohens_d(hurt, calm, plain[layer]), cohens_d(hurt, calm, projected[layer])))
    return rows


def good_trials_by_depth(
    runs: list[Path], num_layers: int, good_refusals: float, good_kl: float
) -> dict[int, tuple[int, int]]:
    """Per layer (the direction index rounded), (good trials, trials) of our global-direction trials."""
    counts: dict[int, tuple[int, int]] = {}
    for path in runs:
        data = json.loads(path.read_text())
        for run in data["runs"]:
            if run["label"] == "heretic":
                continue
            for trial in run["trials"]:
                params = trial.get("params") or {}
                if "direction_index" not in params or params.get("direction_scope", "global") != "global":
                    continue
                layer = min(round(params["direction_index"]), num_layers - 1)
                good = trial["refusals"] <= good_refusals * run["eval_prompts"] and trial["kl"] <= good_kl
                hits, looks = counts.get(layer, (0, 0))
                counts[layer] = (hits + good, looks + 1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=128, help="of each train set")
    parser.add_argument(
        "--runs", nargs="*", type=Path, default=[], help="quality.py JSON files of this model"
    )
    parser.add_argument("--good-refusals", type=float, default=0.25, help="share of the eval prompts")
    parser.add_argument("--good-kl", type=float, default=0.25)
    args = parser.parse_args()
    chat = load_chat_model(
        args.model, ("float32",), device_map="cpu", system_prompt="You are a helpful assistant."
    )
    layers = find_components(chat.model).layers
    residuals = []
    for name in ("harmful_train", "harmless_train"):
        prompts = (PROMPTS / f"{name}.txt").read_text().splitlines()[: args.prompts]
        residuals.append(capture_residuals(chat, chat.encode(prompts, 32), layers))
    rows = separation(*residuals)
    counts = good_trials_by_depth(args.runs, len(rows), args.good_refusals, args.good_kl)
    print(f"{args.model}: {len(rows)} layers, {args.prompts} + {args.prompts} train prompts")
    print(
        "| layer | depth | Cohen's d, mean difference | projected | good trials / trials with a direction from it |"
    )
    print("|---|---|---|---|---|")
    for layer, (plain, projected) in enumerate(rows):
        hits, looks = counts.get(layer, (0, 0))
        share = f"{hits} / {looks}" if looks else "-"
        print(f"| {layer} | {layer / (len(rows) - 1):.2f} | {plain:.2f} | {projected:.2f} | {share} |")


if __name__ == "__main__":
    main()
