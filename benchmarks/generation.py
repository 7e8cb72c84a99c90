"""Where refusal generation spends its time, and what a static KV cache with compilation would save.

Refusal counting is most of a trial (see trials.py): greedy generation of up to 64 tokens for every
harmful eval prompt. This measures `ChatModel.generate` on the 100 built-in harmful eval prompts,
the way a trial calls it, in variants:

- `dynamic`: what a trial does now (transformers' dynamic cache, eager forward, the per-sequence
  refusal-marker stop);
- `dynamic, no stop`: the same without the stop criterion (its cost);
- `static`: `cache_implementation="static"`, with which transformers compiles the decoding step
  (torch.compile, CUDA graphs); the first call pays the compilation and is reported apart.

Each at two batch sizes. It also checks what an in-place weight edit does to a compiled decoder:
the changed model's responses from `static` must equal those from `dynamic` (the CUDA graphs read
the weights in place) and differ from the unchanged ones, and a restore must give the old ones back.

    PYTHONPATH=src:/tmp/site python3 benchmarks/generation.py --shape 7b
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from abliterate.components import find_components
from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import ChatModel, demo_model_path, left_pad
from abliterate.prompts import load_prompts
from abliterate.reset import LayerCache
from abliterate.settings import PromptSet

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512),
}  # fmt: skip


def build(shape: str, device: str) -> ChatModel:
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_model_path())
    vocab = SHAPES[shape]["vocab_size"]
    tokenizer.add_tokens([f"<r{i}>" for i in range(vocab - len(tokenizer))])
    left_pad(tokenizer)
    config = transformers.Qwen2Config(
        **SHAPES[shape], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    return ChatModel(model, tokenizer, f"random {shape}", None, system_prompt="You are a helpful assistant.")


def run(chat: ChatModel, batches, tokens: int, cache: str, stop) -> tuple[float, list[str]]:
    original = chat._greedy_config

    def config(max_new_tokens: int) -> transformers.GenerationConfig:
        generation = original(max_new_tokens)
        if cache == "static":
            generation.cache_implementation = "static"
        return generation

    chat._greedy_config = config
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        responses = [text for batch in batches for text in chat.generate(batch, tokens, stop)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, responses
    finally:
        chat._greedy_config = original


def agreeing(first: list[str], second: list[str]) -> int:
    return sum(a == b for a, b in zip(first, second, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--batch-sizes", default="64,100")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--recompile-check", action="store_true", help="after the edit, also compile afresh and compare"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chat = build(args.shape, device)
    prompts = load_prompts(PromptSet(source="builtin:harmful", split="eval"), "--harmful-eval")
    detector = RefusalDetector(default_refusal_markers())
    print(f"{args.shape} shape, bf16, {device}, {len(prompts)} prompts, {args.tokens} new tokens")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| batch | variant | first call s | median s (of the next calls) |")
    print("|---|---|---|---|")
    results: dict[tuple[int, str], list[str]] = {}
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        batches = chat.encode(prompts, batch_size)
        for variant, cache, stop in (
            ("dynamic", "dynamic", detector),
            ("dynamic, no stop", "dynamic", None),
            ("static", "static", detector),
        ):
            first, responses = run(chat, batches, args.tokens, cache, stop)
            times = [run(chat, batches, args.tokens, cache, stop)[0] for _ in range(args.repeats)]
            results[batch_size, variant] = responses
            print(f"| {batch_size} | {variant} | {first:.2f} | {statistics.median(times):.2f} |", flush=True)

        same = agreeing(results[batch_size, "dynamic"], results[batch_size, "static"])
        print(f"batch {batch_size}: static responses equal to dynamic ones: {same}/{len(prompts)}")

        # An in-place change of every editable matrix (negated: sure to change the responses, unlike
        # a rank-1 edit of random weights), written the way a trial writes: does the compiled decoder see it?
        editable = find_components(chat.model)
        cache_copy = LayerCache(editable)
        with torch.no_grad():
            for *_, matrix in editable.matrices():
                matrix.parameter.neg_()
        _, edited_dynamic = run(chat, batches, args.tokens, "dynamic", detector)
        _, edited_static = run(chat, batches, args.tokens, "static", detector)
        if args.recompile_check:  # the same edited weights, compiled afresh
            torch._dynamo.reset()
            _, fresh = run(chat, batches, args.tokens, "static", detector)
            print(
                f"batch {batch_size}, edited, compiled afresh: equal to dynamic {agreeing(edited_dynamic, fresh)}"
                f"/{len(prompts)}, to the static run compiled before the edit {agreeing(edited_static, fresh)}"
                f"/{len(prompts)}",
                flush=True,
            )
        cache_copy.restore(
            (layer, component) for layer in range(editable.num_layers) for component in ("attn", "mlp")
        )
        same_edited = agreeing(edited_dynamic, edited_static)
        changed = len(prompts) - agreeing(edited_static, results[batch_size, "static"])
        print(
            f"batch {batch_size}, edited in place: static equal to dynamic {same_edited}/{len(prompts)}, "
            f"changed by the edit {changed}/{len(prompts)}",
            flush=True,
        )
        _, restored = run(chat, batches, args.tokens, "static", detector)
        print(f"batch {batch_size}, restored: static equal to before the edit "
              f"{agreeing(restored, results[batch_size, 'static'])}/{len(prompts)}")  # fmt: skip


if __name__ == "__main__":
    main()
