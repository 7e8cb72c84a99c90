"""Which harmless prompts an edit's KL divergence comes from.

A study scores damage as the mean, over the harmless eval prompts, of the KL divergence of the
first response token's distribution from the original model's. This prints that mean prompt by
prompt for a saved model against its original: the median, the share of the largest few, and the
largest ones with the first words of both models' greedy answers, marking the prompts the original
refused. A harmless prompt the original refused and the edit answers is a change a user wants, yet
it counts as damage, and a few of them can set a floor under every edit's KL.

    PYTHONPATH=src python benchmarks/kl_breakdown.py --model runs/x/model --original /tmp/org/model --prompts 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from abliterate.evaluate import kl_divergence
from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import ChatModel, load_chat_model

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "data" / "prompts"


def first_tokens_and_answers(
    model: ChatModel, prompts: list[str], words: int
) -> tuple[torch.Tensor, list[str]]:
    """Log-probabilities of the first response token, (prompts, vocab), and greedy answers."""
    (batch,) = model.encode(prompts, len(prompts))
    return model.response_logprobs(batch, 1)[:, 0], model.generate(batch, words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the edited model's folder")
    parser.add_argument("--original", required=True, help="the original model's folder")
    parser.add_argument("--prompts", type=int, default=100, help="the first N harmless eval prompts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--system-prompt", default="You are a helpful assistant.")
    parser.add_argument("--show", type=int, default=12, help="prompts listed, largest KL first")
    args = parser.parse_args()

    prompts = (PROMPTS / "harmless_eval.txt").read_text().splitlines()[: args.prompts]
    loaded = {}
    for name in ("original", "model"):
        model = load_chat_model(getattr(args, name), (args.dtype,), system_prompt=args.system_prompt)
        loaded[name] = first_tokens_and_answers(model, prompts, 24)
        del model
    (original, original_answers), (edited, answers) = loaded["original"], loaded["model"]
    kl = kl_divergence(original, edited)
    refused = RefusalDetector(default_refusal_markers())
    order = kl.argsort(descending=True).tolist()
    total = kl.sum().item()
    print(f"{args.model} against {args.original}, {len(prompts)} harmless eval prompts")
    print(f"KL mean {kl.mean().item():.4f}, median {kl.median().item():.4f}")
    for top in (3, 6, 12):
        print(f"  the largest {top}: {sum(kl[i].item() for i in order[:top]) / total:.0%} of the sum")
    refusals = [i for i in range(len(prompts)) if refused(original_answers[i])]
    share = sum(kl[i].item() for i in refusals) / total if refusals else 0.0
    print(f"  prompts the original refused: {len(refusals)}, {share:.0%} of the sum")
    print("\n| KL | prompt | original | model |\n|---|---|---|---|")
    for i in order[: args.show]:
        mark = " (refused)" if i in refusals else ""
        shown = [
            text.replace("\n", " ").replace("|", "/")[:40]
            for text in (prompts[i], original_answers[i], answers[i])
        ]
        print(f"| {kl[i].item():.3f} | {shown[0]} | {shown[1]}{mark} | {shown[2]} |")


if __name__ == "__main__":
    main()
