"""Reset strategies on random-weight models of real shapes: time, physical floor, memory.

For each shape (Qwen2.5-0.5B, 7B, 32B) the model is built on the GPU in bfloat16 with random
weights (shape is what costs time), every editable matrix is edited, and each strategy restores it.
Reported per strategy: median restore time, the floor (bytes it must move over the bandwidth
measured in the same run), extra GPU and host memory, peak GPU memory of model + cache, and a check
that the restore was bit-exact.

    PYTHONPATH=src python benchmarks/reset.py [--shapes 0.5b,7b,32b] [--repeats 7] [--disk-shapes 0.5b,7b]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from abliterate.components import find_components
from abliterate.reset import Edit, make_editor, model_bytes

GiB = 1024**3

# Published Qwen2.5 configurations (hidden, intermediate, layers, heads, kv heads, vocab).
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
}  # fmt: skip


def build(shape: str) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(**SHAPES[shape])
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def copy_bandwidth(size: int = 4 * GiB) -> tuple[float, float]:
    """Measured device-to-device (read + write bytes) and pinned host-to-device bandwidth, bytes/s."""
    source = torch.empty(size, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    d2d = median_seconds(lambda: target.copy_(source), repeats=10)
    h2d = median_seconds(lambda: target.copy_(host, non_blocking=True), repeats=5)
    return 2 * size / d2d, size / h2d


def median_seconds(action, repeats: int) -> float:
    action()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def snapshot_hash(editable) -> list[int]:
    """A cheap exactness check: per-matrix sum of the raw bits (any flipped value changes it)."""
    return [int(m.parameter.view(torch.int16).to(torch.int64).sum()) for *_, m in editable.matrices()]


def measure(
    shape: str, strategies: list[str], repeats: int, d2d: float, h2d: float, folder: Path | None
) -> list[dict]:
    model = build(shape)
    editable = find_components(model)
    total, cache = model_bytes(model), editable.editable_bytes
    direction = torch.nn.functional.normalize(torch.randn(editable.hidden_size, device="cuda"), dim=0)
    every_layer = [
        Edit(layer, component, direction, 1.0)
        for layer in range(editable.num_layers)
        for component in ("attn", "mlp")
    ]
    if folder is not None:
        model.save_pretrained(folder)
    original = snapshot_hash(editable)
    rows = []
    for strategy in strategies:
        if strategy in ("disk", "reload") and folder is None:
            continue
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        reload = (
            (
                lambda: transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.bfloat16, device_map="cuda"
                )
            )
            if folder
            else None
        )
        editor = make_editor(strategy, model, editable, folder, reload=reload)
        extra_gpu = torch.cuda.memory_allocated() - before
        extra_host = getattr(getattr(editor, "restorer", None), "host_bytes", 0)

        def cycle(editor=editor):
            editor.apply(every_layer)
            torch.cuda.synchronize()
            start = time.perf_counter()
            editor.reset()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        times = [cycle() for _ in range(repeats if strategy not in ("reload",) else 2)]
        exact = snapshot_hash(editable) == original
        floor = {"gpu-cache": 2 * cache / d2d, "host-cache": cache / h2d}.get(strategy)
        rows.append(dict(
            shape=shape, strategy=strategy, model_gib=total / GiB, editable_gib=cache / GiB,
            reset_s=statistics.median(times), floor_s=floor, extra_gpu_gib=extra_gpu / GiB,
            extra_host_gib=extra_host / GiB, peak_gpu_gib=torch.cuda.max_memory_allocated() / GiB, exact=exact,
        ))  # fmt: skip
        print(format_row(rows[-1]), flush=True)
        if hasattr(editor, "remove"):
            editor.remove()
        del editor
    del model, editable
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def compare_copy_kernels(shape: str, repeats: int, d2d: float) -> None:
    """Per-tensor copy_ (one memcpy each) against one fused _foreach_copy_ over the same tensors."""
    model = build(shape)
    editable = find_components(model)
    targets = [m.parameter.data for *_, m in editable.matrices()]
    sources = [t.clone() for t in targets]
    floor = 2 * editable.editable_bytes / d2d

    def per_tensor():
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    for name, action in (
        ("copy_ per tensor", per_tensor),
        ("_foreach_copy_", lambda: torch._foreach_copy_(targets, sources)),
    ):
        seconds = median_seconds(action, repeats)
        print(
            f"{shape} {len(targets)} tensors, {name}: {seconds * 1e3:.2f} ms = {seconds / floor:.2f} x floor ({floor * 1e3:.2f} ms)"
        )


HEADER = "| shape | strategy | model GiB | editable GiB (%) | reset (median) | floor | x floor | extra GPU GiB | extra host GiB | peak GPU GiB | exact |"


def format_row(row: dict) -> str:
    floor = row["floor_s"]
    ratio = f"{row['reset_s'] / floor:.2f}" if floor else "-"
    floor_text = f"{floor * 1e3:.1f} ms" if floor else "-"
    reset = row["reset_s"]
    reset_text = f"{reset * 1e3:.1f} ms" if reset < 1 else f"{reset:.2f} s"
    share = 100 * row["editable_gib"] / row["model_gib"]
    return (
        f"| {row['shape']} | {row['strategy']} | {row['model_gib']:.1f} | {row['editable_gib']:.2f} ({share:.1f}%) | "
        f"{reset_text} | {floor_text} | {ratio} | {row['extra_gpu_gib']:.2f} | {row['extra_host_gib']:.2f} | "
        f"{row['peak_gpu_gib']:.1f} | {'yes' if row['exact'] else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.5b,7b,32b")
    parser.add_argument(
        "--disk-shapes", default="0.5b,7b", help="shapes also timed with disk and full reload"
    )
    parser.add_argument("--strategies", default="gpu-cache,host-cache,disk,reload,adapter")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--compare-copy-kernels", action="store_true", help="only time copy_ against _foreach_copy_"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    d2d, h2d = copy_bandwidth()
    torch.cuda.empty_cache()
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"measured bandwidth: device-to-device {d2d / 1e12:.2f} TB/s (read+write), pinned host-to-device {h2d / 1e9:.1f} GB/s"
    )
    if args.compare_copy_kernels:
        for shape in args.shapes.split(","):
            compare_copy_kernels(shape, args.repeats, d2d)
        return
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    strategies = args.strategies.split(",")
    for shape in args.shapes.split(","):
        if shape in args.disk_shapes.split(","):
            with tempfile.TemporaryDirectory(dir="/tmp") as folder:
                measure(shape, strategies, args.repeats, d2d, h2d, Path(folder))
        else:
            measure(shape, strategies, args.repeats, d2d, h2d, None)


if __name__ == "__main__":
    main()
