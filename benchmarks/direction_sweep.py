"""Which layer's refusal direction works: the classic edit, one layer's direction at a time.

For each chosen layer and projection, the refusal direction of that layer (mean difference, or
projected against the harmless mean) is removed from every layer's `o_proj` and `down_proj` at
weight 1 (Arditi et al.), and the model is scored as a study scores a trial: refusals on the
harmful eval prompts, KL of the first token on the harmless ones. It shows where on a model's
depth the search should look (`space.RANGES`), and gives the hand-made edit a study should reach.

`--ranks 1,2,3` also removes a small subspace instead of the one direction: the direction and the
leading principal directions of what is left of the harmful prompts' offsets from the harmless mean
once the direction and the harmless mean are taken out (`subspace`). It asks whether refusal lives
in more than one direction on a model, before the search is given such a parameter.

    python benchmarks/direction_sweep.py --model DIR [--layers 3,5,7] [--projections 0,1] [--ranks 1]
        [--train-prompts 128] [--eval-prompts 48] [--dtype float32] [--system-prompt TEXT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from abliterate.ablation import ablate_
from abliterate.components import find_components
from abliterate.directions import capture_residuals, directions_at, refusal_directions
from abliterate.evaluate import Evaluator
from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import load_chat_model
from abliterate.prompts import load_prompts
from abliterate.settings import PromptSet


def prompts(name: str, split: str, count: int) -> list[str]:
    return load_prompts(PromptSet(source=f"builtin:{name}", split=f"{split}[:{count}]"), f"{name} {split}")


def subspace(
    harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor, rank: int
) -> torch.Tensor:
    """Orthonormal (rank, hidden): `direction` first, then the leading principal directions of the
    harmful residuals' offsets from the harmless mean, (prompts, hidden), with their parts along the
    direction and the harmless mean removed (uncentered: what they share counts too)."""
    if rank == 1:
        return direction[None]
    harmless_mean = harmless.mean(dim=0)
    taken = torch.linalg.qr(torch.stack([direction, harmless_mean], dim=1)).Q  # (hidden, 2)
    offsets = harmful - harmless_mean
    offsets = offsets - (offsets @ taken) @ taken.T
    extra = torch.linalg.svd(offsets, full_matrices=False).Vh[: rank - 1]
    return torch.cat([direction[None], extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or hub id; default: the demo model")
    parser.add_argument("--layers", help="comma-separated layer indices; default: every layer")
    parser.add_argument("--projections", default="0,1", help="0 = mean difference, 1 = projected")
    parser.add_argument("--ranks", default="1", help="directions removed: 1, or a small subspace")
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device-map", default="auto")
    parser.add_argument("--system-prompt", default="You are a helpful assistant.")
    args = parser.parse_args()

    model = load_chat_model(args.model, [args.dtype], args.device_map, system_prompt=args.system_prompt)
    editable = find_components(model.model)
    residuals = [
        capture_residuals(
            model,
            model.encode(prompts(name, "train", args.train_prompts), args.batch_size),
            editable.layers,
        )
        for name in ("harmful", "harmless")
    ]
    basis = refusal_directions(*residuals, "search")
    evaluator = Evaluator(
        model,
        prompts("harmful", "eval", args.eval_prompts),
        prompts("harmless", "eval", args.eval_prompts),
        RefusalDetector(default_refusal_markers()),
        args.batch_size,
        args.max_response_length,
    )
    last = editable.num_layers - 1
    layers = [int(x) for x in args.layers.split(",")] if args.layers else range(editable.num_layers)
    originals = {matrix.name: matrix.parameter.detach().clone() for *_, matrix in editable.matrices()}
    print(
        f"{args.model}: {editable.num_layers} layers, original {evaluator.count_refusals()}/{args.eval_prompts}"
    )
    print("| direction of layer | fraction of depth | projection | rank | refusals | KL | seconds |")
    print("|---|---|---|---|---|---|---|")
    for projection in (float(x) for x in args.projections.split(",")):
        directions = directions_at(basis, projection)
        for layer in layers:
            for rank in (int(x) for x in args.ranks.split(",")):
                started = time.time()
                removed = subspace(
                    residuals[0][:, layer].float(),
                    residuals[1][:, layer].float(),
                    directions[layer].float(),
                    rank,
                )
                try:
                    for *_, matrix in editable.matrices():
                        for direction in removed:  # orthonormal: one after another removes their span
                            ablate_(matrix.view(), direction, 1.0)
                    refusals, kl = evaluator.count_refusals(), evaluator.kl()
                finally:
                    with torch.no_grad():
                        for *_, matrix in editable.matrices():
                            matrix.parameter.copy_(originals[matrix.name])
                print(
                    f"| {layer} | {layer / last:.2f} | {projection:g} | {rank} | {refusals}/{args.eval_prompts} "
                    f"| {kl:.3f} | {time.time() - started:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
