"""Train the shipped refusal classifier, `src/abliterate/data/refusal_classifier/`, and check it.

A two-layer Llama sequence classifier (labels `compliance` and `refusal`) over the demo model's
byte-level tokenizer, trained from scratch on the CPU in about a minute, deterministically. It
serves `--refusal-judge classifier|both` on the demo model and in the tests; real models deserve a
real classifier (`--refusal-classifier`, see docs/usage.md).

Its data is the project's own, in demo/data/: hard refusals (they hold a marker such as "I can't"),
soft refusals (no marker: "I'd rather not get into that"), plain compliance, and apologetic or
marker-worded compliance ("Sorry to hear that! Here is how..."), the last two cases being what
keyword markers get wrong. Responses are composed from these lines (a refusal may go on with a
redirection or ramble on, compliance may be an opener alone or open with one: the demo model's
answers often do), and some are cut short, as a study's responses
are cut at --max-response-length. Every fifth line of each file is held out: the check composes
its examples from held-out lines only, so it measures wording the classifier never saw.

    .venv/bin/python demo/classifier.py           # train, check, write the model (exit 1 if a check fails)
    .venv/bin/python demo/classifier.py --check   # check the shipped model only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from abliterate.judge import RefusalDetector, default_refusal_markers, shipped_classifier_path  # noqa: E402

DATA = ROOT / "demo" / "data"
LABELS = {0: "compliance", 1: "refusal"}
HELD_OUT_EVERY = 5
# Held-out accuracy each kind of response must reach.
REQUIRED_ACCURACY = 0.9


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def sources() -> dict[str, list[str]]:
    """Every line the examples are made of, by kind."""
    answers = [json.loads(line)["answer"] for line in lines(DATA / "harmless_answers.jsonl")]
    return {
        "hard_refusal": lines(DATA / "classifier" / "hard_refusals.txt") + lines(DATA / "refusals.txt"),
        "soft_refusal": lines(DATA / "classifier" / "soft_refusals.txt"),
        "redirect": lines(DATA / "classifier" / "redirect_tails.txt"),
        "compliance": lines(DATA / "classifier" / "compliant.txt") + answers,
        "apologetic_compliance": lines(DATA / "classifier" / "apologetic_compliance.txt"),
        "opener": lines(DATA / "compliant_openers.txt"),
    }


def split(items: list[str], held_out: bool) -> list[str]:
    return [item for index, item in enumerate(items) if (index % HELD_OUT_EVERY == 0) == held_out]


def cut_short(text: str, rng: random.Random) -> str:
    """The text cut after a random word, keeping at least six words and two thirds of them."""
    words = text.split()
    keep = rng.randint(max(6, (2 * len(words)) // 3), len(words)) if len(words) > 6 else len(words)
    return " ".join(words[:keep])


def compose(kind: str, parts: dict[str, list[str]], rng: random.Random) -> str:
    """One response of `kind`, from the lines in `parts`."""
    if kind in ("hard_refusal", "soft_refusal"):
        text = rng.choice(parts[kind])
        draw = rng.random()
        if draw < 0.4:
            text += " " + rng.choice(parts["redirect"])
        elif draw < 0.55:  # a refusal that rambles on is still one: what it said first decides
            text += " " + rng.choice(parts["compliance"])
    elif kind == "compliance":
        draw = rng.random()
        if draw < 0.2:  # an opener alone: "Glad to help. Let's break this down into a few clear steps."
            text = rng.choice(parts["opener"])
        elif draw < 0.5:
            text = rng.choice(parts["opener"]) + " " + rng.choice(parts["compliance"])
        else:
            text = rng.choice(parts["compliance"])
    else:  # apologetic compliance, sometimes followed by more of the answer
        text = rng.choice(parts[kind])
        if rng.random() < 0.3:
            text += " " + rng.choice(parts["compliance"])
    return cut_short(text, rng) if rng.random() < 0.3 else text


KINDS = {"hard_refusal": 1, "soft_refusal": 1, "compliance": 0, "apologetic_compliance": 0}


def examples(held_out: bool, per_kind: int, seed: int) -> list[tuple[str, int, str]]:
    """(text, label, kind) for each kind, from the training or the held-out lines."""
    parts = {name: split(items, held_out) for name, items in sources().items()}
    rng = random.Random(seed)
    made = [
        (compose(kind, parts, rng), label, kind) for kind, label in KINDS.items() for _ in range(per_kind)
    ]
    rng.shuffle(made)
    return made


def build_model(tokenizer) -> transformers.LlamaForSequenceClassification:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={name: index for index, name in LABELS.items()},
    )
    return transformers.LlamaForSequenceClassification(config)


def classify(model, tokenizer, texts: list[str], batch_size: int = 128) -> list[int]:
    predictions: list[int] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
            )
            predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions


def train(args: argparse.Namespace, tokenizer) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = build_model(tokenizer)
    data = examples(held_out=False, per_kind=args.per_kind, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * (len(data) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(args.seed)
    step = 0
    for epoch in range(args.epochs):
        rng.shuffle(data)
        model.train()
        total = 0.0
        for start in range(0, len(data) - args.batch_size + 1, args.batch_size):
            texts, labels, _ = zip(*data[start : start + args.batch_size], strict=True)
            batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor(labels)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}: mean loss {total / (len(data) // args.batch_size):.4f}")
    return model


def check(model, tokenizer, seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy per kind, the classifier's and the markers'."""
    held_out = examples(held_out=True, per_kind=200, seed=seed + 1)
    texts = [text for text, _, _ in held_out]
    predicted = classify(model, tokenizer, texts)
    markers = RefusalDetector(default_refusal_markers())
    results: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        rows = [
            (p, label, text) for p, (text, label, k) in zip(predicted, held_out, strict=True) if k == kind
        ]
        results[kind] = {
            "classifier": sum(p == label for p, label, _ in rows) / len(rows),
            "markers": sum(int(markers(text)) == label for _, label, text in rows) / len(rows),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=shipped_classifier_path())
    parser.add_argument("--check", action="store_true", help="check the model in --out; train nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=2000, help="training examples of each kind")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.check:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.out)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.out)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            ROOT / "src" / "abliterate" / "data" / "demo_model"
        )
        tokenizer.padding_side = "right"  # the classifier reads the last real token
        tokenizer.model_max_length = 128
        tokenizer.chat_template = None
        model = train(args, tokenizer)
    results = check(model, tokenizer, args.seed)
    print("held-out accuracy (responses made of lines the classifier never saw):")
    print("| kind | classifier | markers |\n|---|---|---|")
    for kind, accuracy in results.items():
        print(f"| {kind} | {accuracy['classifier']:.3f} | {accuracy['markers']:.3f} |")
    failed = [kind for kind, accuracy in results.items() if accuracy["classifier"] < REQUIRED_ACCURACY]
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        record = {key: value for key, value in vars(args).items() if key not in ("out", "check")}
        (args.out / "train_args.json").write_text(
            json.dumps({**record, "held_out": results}, indent=1) + "\n"
        )
        print(f"wrote {args.out}")
    if failed:
        print(f"below {REQUIRED_ACCURACY} held-out accuracy: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
