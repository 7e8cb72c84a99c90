"""Saving an adapter run: the edit merged shard by shard, against loading the whole model to edit it.

Adapter runs (and so every 4-bit run) never write the weights, so saving must put the chosen edit
into a full-precision copy. `merge_checkpoint` streams the source's safetensors files one at a
time; the alternative loads the whole model on the CPU, edits it and saves it. Each runs in its
own process on the same random-weight model (a real architecture's shape, sharded like a hub
checkpoint), with every editable matrix of every layer edited; peak resident memory and wall time
are reported, and the two outputs are compared tensor by tensor.

    PYTHONPATH=src python3 benchmarks/export.py --workdir /tmp/export-bench --shape 1.5b
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

SHAPES = {  # Qwen2.5 shapes
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip


def make_model(shape: str, folder: Path, shard_size: str) -> None:
    if (folder / "config.json").is_file():
        return
    config = transformers.Qwen2Config(**SHAPES[shape], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size=shard_size)


def edits_for(folder: Path):
    """One edit per (layer, component), weight 1, each along its own random direction."""
    from abliterate.components import COMPONENTS
    from abliterate.reset import Edit

    config = transformers.AutoConfig.from_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator)
    return [
        Edit(layer, c, directions[layer], 1.0)
        for layer in range(config.num_hidden_layers)
        for c in COMPONENTS
    ]


def save(method: str, source: Path, target: Path) -> None:
    """Runs in a child process, so that its peak memory is its own."""
    from abliterate.components import find_components
    from abliterate.export import merge_checkpoint
    from abliterate.reset import apply_edit

    target.mkdir(parents=True)
    edits = edits_for(source)
    if method == "merge":
        # The editable matrices as the study's model sees them, without their weights in memory.
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(source)
            )
        merge_checkpoint(source, target, find_components(skeleton), edits, "none")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map="cpu")
        editable = find_components(model)
        for edit in edits:
            apply_edit(editable, edit)
        model.save_pretrained(target)


def measure(method: str, source: Path, target: Path) -> tuple[float, float]:
    """Wall seconds and peak resident GiB of one save, in a fresh process.

    The parent never holds weights: a forked child starts with its parent's resident pages counted
    in its own peak.
    """
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", method, "--source", str(source), "--target", str(target)]
    )
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{method} failed with exit code {code}")
    return seconds, usage.ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--child", choices=["make", "merge", "load"])
    parser.add_argument("--source", type=Path)
    parser.add_argument("--target", type=Path)
    args = parser.parse_args()
    if args.child == "make":
        make_model(args.shape, args.target, args.shard_size)
        return
    if args.child:
        save(args.child, args.source, args.target)
        return

    source = args.workdir / f"qwen2.5-{args.shape}"
    subprocess.run(
        [sys.executable, __file__, "--child", "make", "--shape", args.shape, "--shard-size", args.shard_size,
         "--target", str(source)],
        check=True,
    )  # fmt: skip
    size = sum(path.stat().st_size for path in source.glob("*.safetensors")) / 1024**3
    shards = len(list(source.glob("*.safetensors")))
    print(f"model: Qwen2.5-{args.shape} shape, random bf16 weights, {size:.2f} GiB in {shards} shards")
    print("| save | wall | peak resident memory |\n|---|---|---|")
    outputs = {}
    for method in ("merge", "load"):
        target = args.workdir / f"out-{method}"
        shutil.rmtree(target, ignore_errors=True)
        seconds, peak = measure(method, source, target)
        outputs[method] = target
        print(f"| {method} | {seconds:.1f} s | {peak:.2f} GiB |", flush=True)
    print(f"outputs identical: {identical(outputs['merge'], outputs['load'])}")


def identical(first: Path, second: Path) -> str:
    """Compare two checkpoints tensor by tensor, two tensors in memory at a time."""
    from safetensors import safe_open

    from abliterate.checkpoint import key_files

    first_keys, second_keys = key_files(first), key_files(second)
    if first_keys.keys() != second_keys.keys():
        return "False (different tensor names)"
    for key, file in first_keys.items():
        with safe_open(str(file), "pt") as a, safe_open(str(second_keys[key]), "pt") as b:
            if not torch.equal(a.get_tensor(key), b.get_tensor(key)):
                return f"False ({key} differs)"
    return f"True ({len(first_keys)} tensors)"


if __name__ == "__main__":
    main()
