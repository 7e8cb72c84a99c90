"""A refusing variant of a small real chat model, made the way chat models learn to refuse.

Small open models barely refuse, so the quality benchmark (`benchmarks/quality.py`) first gives one
a short safety tune: LoRA adapters trained to answer harmful requests with a refusal (the
project's own refusal lines, `demo/data/refusals.txt`) while harmless requests keep the model's
own greedy answers, generated before the tune (self-distillation), so that the rest of its
behaviour stays. A base model, which has no answers of its own yet, learns the project's written
ones instead (`--harmless-answers written`): the tune is then its chat tune, refusals included.
The harmful and harmless training prompts are the demo model's extra training sets
(`demo/data/extra_*`), which share no request with the built-in eval sets.

    python benchmarks/organism.py train --base MODEL --out DIR [--device cuda]
        [--harmless-answers written --chat-template FILE --end-of-turn TOKEN]   (a base model)
        DIR/adapter.safetensors (bfloat16), DIR/organism.json (recipe, refusal rates, time), DIR/model/
    python benchmarks/organism.py build --base MODEL --adapter DIR/adapter.safetensors --out DIR/model
    python benchmarks/organism.py check --model DIR/model [--device cuda]

MODEL is a Hugging Face folder or a `.gguf` file (read by transformers, dequantized). The merged
model is always the base plus the bfloat16 adapter, merged in float32 on the CPU, so `train` and
`build` write the same weights. Training is deterministic for a given device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from abliterate.judge import RefusalDetector, default_refusal_markers  # noqa: E402
from abliterate.prompts import load_prompts  # noqa: E402
from abliterate.settings import PromptSet  # noqa: E402

# The system prompt of every benchmark run, ours and heretic's (heretic always sends one).
SYSTEM_PROMPT = "You are a helpful assistant."
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA = ROOT / "demo" / "data"


def load_base(
    source: str, device: str = "cpu", chat_template: str | None = None, end_of_turn: str | None = None
):
    """A model and tokenizer from a folder, or from a .gguf file dequantized to float32.

    A base model's GGUF may ship no chat template: `chat_template` (a Jinja file) gives it one, and
    `end_of_turn` the token that closes an answer in it, which then also stops generation.
    """
    path = Path(source)
    options = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **options)
    if chat_template:
        tokenizer.chat_template = Path(chat_template).read_text("utf-8")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    if options:  # dequantized, but marked as a GGUF model that cannot be saved: rebuild it plain
        config = model.config
        del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    if end_of_turn:
        stops = model.generation_config.eos_token_id
        stops = [stops] if isinstance(stops, int) else list(stops or [tokenizer.eos_token_id])
        model.generation_config.eos_token_id = [*stops, tokenizer.convert_tokens_to_ids(end_of_turn)]
    return model.to(device), tokenizer


def messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def prompt_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy answers, batched with left padding."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a whole exchange, and labels that train only the answer (and its end of turn)."""
    context = prompt_text(tokenizer, prompt)
    whole = tokenizer.apply_chat_template(
        [*messages(prompt), {"role": "assistant", "content": answer}], tokenize=False
    )
    if not whole.startswith(context):
        raise ValueError("the chat template renders the answer's context differently from the prompt")
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    ids = tokenizer(whole, add_special_tokens=False).input_ids
    return ids, [-100] * len(context_ids) + ids[len(context_ids) :]


def lora(model, rank: int):
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def merged(base, tokenizer, adapter: dict[str, torch.Tensor], rank: int):
    """The base model with a (bfloat16) adapter merged in, in float32 on the CPU."""
    import peft

    model = lora(base.to("cpu"), rank)
    peft.set_peft_model_state_dict(model, {name: value.float() for name, value in adapter.items()})
    return model.merge_and_unload()


def train(args: argparse.Namespace) -> None:
    started = time.time()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = load_base(args.base, args.device, args.chat_template, args.end_of_turn)

    harmful = sorted(
        {
            line.strip()
            for f in sorted(DATA.glob("extra_harmful_train*.txt"))
            for line in f.open()
            if line.strip()
        }
    )
    written = {
        record["prompt"]: record["answer"]
        for f in sorted(DATA.glob("extra_harmless_train*.jsonl"))
        for record in map(json.loads, f.open())
    }
    harmless = sorted(written)
    refusals = [line.strip() for line in (DATA / "refusals.txt").open() if line.strip()]
    rng.shuffle(harmful)
    rng.shuffle(harmless)
    harmless = harmless[: args.harmless]
    model.eval()
    if args.harmless_answers == "self":
        print(f"self-distilling {len(harmless)} harmless answers", flush=True)
        answers = generate(model, tokenizer, harmless, args.answer_tokens)
    else:  # a base model has no answers of its own yet: the tune teaches it to answer, as a chat tune does
        answers = [written[prompt] for prompt in harmless]
    examples = [example(tokenizer, p, rng.choice(refusals)) for p in harmful]
    kept = [example(tokenizer, p, a) for p, a in zip(harmless, answers, strict=True) if a]
    print(
        f"{len(examples)} refusal examples, {len(kept)} harmless ones ({args.harmless_answers})", flush=True
    )

    model = lora(model, args.rank)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    per_batch_harmful = round(args.batch_size * args.harmful_fraction)
    pad = tokenizer.pad_token_id
    for step in range(args.steps):
        batch = rng.sample(examples, per_batch_harmful) + rng.sample(
            kept, args.batch_size - per_batch_harmful
        )
        length = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in batch], device=args.device)
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in batch], device=args.device)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in batch], device=args.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:>4}: loss {loss.item():.4f}", flush=True)

    import peft

    adapter = {
        k: v.detach().to("cpu", torch.bfloat16) for k, v in peft.get_peft_model_state_dict(model).items()
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter, out / "adapter.safetensors")
    base, tokenizer = load_base(args.base, "cpu", args.chat_template, args.end_of_turn)
    model = merged(base, tokenizer, adapter, args.rank)
    save(model, tokenizer, out / "model")
    rates = check_model(model.to(args.device), tokenizer, limit=args.check_prompts)
    recipe = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    record = {"recipe": recipe, "refusals": rates, "seconds": round(time.time() - started, 1)}
    (out / "organism.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["refusals"]), flush=True)


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_model(model, tokenizer, max_new_tokens: int = 64, limit: int = 100) -> dict:
    """Refusals (the shipped markers) on the built-in eval sets, greedy, with the benchmark's system prompt."""
    model.eval()
    detector = RefusalDetector(default_refusal_markers())
    rates = {}
    for name in ("harmful", "harmless"):
        prompts = load_prompts(PromptSet(source=f"builtin:{name}", split=f"eval[:{limit}]"), f"--{name}-eval")
        answers = generate(model, tokenizer, prompts, max_new_tokens)
        rates[f"{name}_eval"] = f"{sum(map(detector, answers))}/{len(answers)}"
        for prompt, answer in list(zip(prompts, answers, strict=True))[:2]:
            print(f"[{name}] {prompt}\n  -> {answer[:160]!r}", flush=True)
    return rates


def build(args: argparse.Namespace) -> None:
    base, tokenizer = load_base(args.base, "cpu", args.chat_template, args.end_of_turn)
    adapter = load_file(args.adapter)
    rank = next(v.shape[0] for k, v in adapter.items() if "lora_A" in k)
    save(merged(base, tokenizer, adapter, rank), tokenizer, Path(args.out))
    print(f"wrote {args.out}")


def check(args: argparse.Namespace) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    print(json.dumps(check_model(model, tokenizer)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("train", help="self-distil, tune, merge, check")
    tune.add_argument("--base", required=True, help="Hugging Face folder or .gguf file")
    tune.add_argument("--out", required=True)
    tune.add_argument("--device", default="cpu")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--rank", type=int, default=8)
    tune.add_argument("--steps", type=int, default=200)
    tune.add_argument("--lr", type=float, default=3e-4)
    tune.add_argument("--batch-size", type=int, default=32)
    tune.add_argument("--harmful-fraction", type=float, default=0.35)
    tune.add_argument("--harmless", type=int, default=768, help="harmless prompts to self-distil")
    tune.add_argument(
        "--harmless-answers",
        choices=["self", "written"],
        default="self",
        help="self: the model's own greedy answers (a chat model); written: the project's (a base model)",
    )
    tune.add_argument("--answer-tokens", type=int, default=64, help="length of the self-distilled answers")
    tune.add_argument("--check-prompts", type=int, default=100, help="eval prompts of each kind to check")
    tune.set_defaults(func=train)
    rebuild = commands.add_parser("build", help="merge a saved adapter into the base")
    rebuild.add_argument("--base", required=True)
    rebuild.add_argument("--adapter", required=True)
    rebuild.add_argument("--out", required=True)
    rebuild.set_defaults(func=build)
    inspect = commands.add_parser("check", help="refusal rates of a model folder")
    inspect.add_argument("--model", required=True)
    inspect.add_argument("--device", default="cpu")
    inspect.set_defaults(func=check)
    for command in (tune, rebuild):  # the same recipe must give train and build the same tokenizer
        command.add_argument("--chat-template", help="Jinja file, for a base model that ships none")
        command.add_argument("--end-of-turn", help="the token that ends an answer in that template")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
