"""Where the refusal generation's time goes, on one batch of the harmful eval prompts.

The compiled decoder (`--compile`: a static KV cache, the decoding step compiled by transformers)
is timed through `ChatModel.generate` with abliterate's stop check and without it, for 1 and for
`--new-tokens` tokens (their difference is the decode steps' time); then the model's forward
pass alone, compiled the same way and called step by step on a static cache, which is what a
decode step costs without transformers' generation loop around it; then a profile of generate's
steps, by operator. Random weights never end a response, so every run makes every token. Also
one forward pass of the whole batch (what the prefill and the KL pass run), eager and compiled.

    PYTHONPATH=src:/tmp/site python3 benchmarks/decode.py --model /tmp/bench/model-7b
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import STOP_CHECK_EVERY_ON_GPU, ChatModel, _StopWhen, load_chat_model

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "data" / "prompts"
SDPA_BACKENDS = {
    "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "math": torch.nn.attention.SDPBackend.MATH,
}


def seconds(run: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of `repeat` runs, after one to warm up (and compile)."""
    run()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def forward_steps(model: transformers.PreTrainedModel, batch: dict, new_tokens: int) -> Callable[[], None]:
    """Prefill, then `new_tokens - 1` greedy steps of the compiled forward on a static cache."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    length = input_ids.shape[1]
    cache = transformers.StaticCache(config=model.config, max_cache_len=length + new_tokens)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], new_tokens)], dim=1)

    @torch.inference_mode()
    def run() -> None:
        cache.reset()
        positions = torch.arange(length, device=input_ids.device)
        logits = model(
            input_ids=input_ids, attention_mask=mask, past_key_values=cache, cache_position=positions,
            logits_to_keep=1, use_cache=True,
        ).logits  # fmt: skip
        token = logits[:, -1].argmax(-1, keepdim=True)
        for index in range(new_tokens - 1):
            position = torch.tensor([length + index], device=input_ids.device)
            logits = step(
                input_ids=token, attention_mask=full_mask[:, : length + index + 1], past_key_values=cache,
                cache_position=position, use_cache=True,
            ).logits  # fmt: skip
            token = logits[:, -1].argmax(-1, keepdim=True)

    return run


def whole_batch_forward(
    model: transformers.PreTrainedModel, batch: dict, mode: str | None
) -> Callable[[], None]:
    """One forward pass of the whole batch, the last position's logits kept: what the prefill and
    the KL pass run each trial (eagerly today), or compiled with torch.compile's `mode`."""
    forward = model.forward if mode is None else torch.compile(model.forward, mode=mode, fullgraph=True)

    @torch.inference_mode()
    def run() -> None:
        forward(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=1,
            use_cache=False,
        )

    return run


def transformers_generate(chat: ChatModel) -> Callable[..., list[str]]:
    """`ChatModel.generate` as it was before decoding.py: transformers' generate on a static cache,
    with the same stop check."""

    def generate(
        batch: dict, max_new_tokens: int, finished: Callable[[str], bool] | None = None
    ) -> list[str]:
        length = batch["input_ids"].shape[1]
        criteria = transformers.StoppingCriteriaList()
        if finished is not None:
            every = chat.stop_check_every or STOP_CHECK_EVERY_ON_GPU
            criteria.append(_StopWhen(chat.decode, length, finished, every))
        config = chat._greedy_config(max_new_tokens)
        output = chat.model.generate(**batch, generation_config=config, stopping_criteria=criteria)
        return chat.decode(output[:, length:])

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--sdpa", choices=SDPA_BACKENDS, help="attention kernels allowed; default: torch's choice"
    )
    parser.add_argument(
        "--attention", choices=("grouped", "sdpa"), default="grouped",
        help="grouped: abliterate's decode attention (attention.py); sdpa: transformers' own",
    )  # fmt: skip
    parser.add_argument(
        "--decoder", choices=("ours", "transformers"), default="ours",
        help="ours: abliterate's greedy loop (decoding.py); transformers: its generate on a static cache",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="generate's step time only, no profile")
    args = parser.parse_args()
    if args.sdpa:
        with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[args.sdpa]):
            measure(args)
    else:
        measure(args)


def measure(args: argparse.Namespace) -> None:
    chat = load_chat_model(
        args.model, ("bfloat16",), device_map="cuda", system_prompt="You are a helpful assistant."
    )
    chat.compiled_generation = True
    if args.attention == "sdpa":
        chat.model.set_attn_implementation("sdpa")
    prompts = (PROMPTS / "harmful_eval.txt").read_text().splitlines()[: args.prompts]
    (batch,) = chat.encode(prompts, len(prompts), common_length=True)
    markers = RefusalDetector(default_refusal_markers())
    steps = args.new_tokens - 1
    print(
        f"{torch.cuda.get_device_name()}, batch {len(prompts)} x {batch['input_ids'].shape[1]} prompt tokens, "
        f"attention {chat.model.config._attn_implementation}, decoder {args.decoder}"
    )

    generate = chat.generate if args.decoder == "ours" else transformers_generate(chat)
    one = seconds(lambda: generate(batch, 1))
    plain = seconds(lambda: generate(batch, args.new_tokens))
    checked = seconds(lambda: generate(batch, args.new_tokens, markers))
    print(f"generate, 1 token (prefill): {one:.3f} s")
    print(f"generate, {args.new_tokens} tokens: {plain:.3f} s, {(plain - one) / steps * 1e3:.2f} ms a step")
    # The prefill and the KL pass: one whole-batch forward each, eager; would compiling pay?
    for mode in (None, "default", "reduce-overhead"):
        label = "eager" if mode is None else f"compiled, {mode}"
        try:
            spent = seconds(whole_batch_forward(chat.model, batch, mode))
            print(f"a whole-batch forward, {label}: {spent * 1e3:.1f} ms")
        except Exception as error:  # a measurement, not a requirement: say why and go on
            print(f"a whole-batch forward, {label}: failed, {type(error).__name__}: {str(error)[:300]}")
    if args.quick:
        return
    print(f"  with the stop check every {chat.stop_check_every or 4} steps: {checked:.3f} s, "
          f"{(checked - one) / steps * 1e3:.2f} ms a step")  # fmt: skip
    for every in (1, 16):
        chat.stop_check_every = every
        checked = seconds(lambda: generate(batch, args.new_tokens, markers))
        print(
            f"  with the stop check every {every} steps: {checked:.3f} s, {(checked - one) / steps * 1e3:.2f} ms a step"
        )
    chat.stop_check_every = None
    try:
        alone = seconds(forward_steps(chat.model, batch, args.new_tokens))
        print(f"the compiled forward alone, {args.new_tokens} tokens: {alone:.3f} s, "
              f"{(alone - one) / steps * 1e3:.2f} ms a step (prefill counted as generate's)")  # fmt: skip
    except Exception as error:  # a measurement, not a requirement: say why and go on
        print(f"the compiled forward alone: failed, {type(error).__name__}: {str(error)[:300]}")

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profile:
        generate(batch, args.new_tokens, markers)
        torch.cuda.synchronize()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(
        profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
