"""The floor of a trial: the least time the hardware allows for what a trial must do.

A trial generates up to `new_tokens` tokens for every harmful eval prompt and runs one forward
pass over the harmless ones (KL). Its floor is the sum of:

- decoding: every decode step reads every weight once (a step is memory-bound at these batch
  sizes), so `decode steps x weight bytes / memory bandwidth`, with `decode steps = batches x
  new tokens` for the harmful prompts in batches of `batch_size`;
- prefill and KL: matrix work, `2 x parameters x tokens` FLOPs for the harmful prompts' prompt
  tokens and the harmless prompts' tokens, over the matmul throughput.

The KV cache, attention over it, the vocabulary projection's FLOPs beyond `2 x parameters` and every
non-matmul kernel are left out: the floor is a bound no implementation reaches, and a ratio to it
says how much of a trial is overhead. Bandwidth and throughput are measured on the device
(`measure_device`), not taken from a data sheet.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    bandwidth: float  # bytes per second, a large device-to-device copy (read + write)
    matmul_flops: float  # FLOP per second, a large square matmul in the model's dtype


@dataclass(frozen=True)
class Workload:
    parameters: int  # of the whole model (embeddings included: the decode step reads the output head)
    weight_bytes: int
    harmful_prompts: int
    harmless_prompts: int
    prompt_tokens: int  # mean tokens of a formatted prompt
    new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class Floor:
    decode: float
    prefill: float
    kl: float

    @property
    def total(self) -> float:
        return self.decode + self.prefill + self.kl


def trial_floor(work: Workload, device: Device) -> Floor:
    decode_steps = math.ceil(work.harmful_prompts / work.batch_size) * work.new_tokens
    return Floor(
        decode=decode_steps * work.weight_bytes / device.bandwidth,
        prefill=2 * work.parameters * work.harmful_prompts * work.prompt_tokens / device.matmul_flops,
        kl=2 * work.parameters * work.harmless_prompts * work.prompt_tokens / device.matmul_flops,
    )


def measure_device(device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 10) -> Device:
    """Memory bandwidth and matmul throughput as this device delivers them (best of `repeats`)."""
    source = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)  # 512 MiB
    target = torch.empty_like(source)
    copy_seconds = _best(lambda: target.copy_(source), device, repeats)
    size = 8192 if device.type == "cuda" else 1024
    left = torch.randn(size, size, dtype=dtype, device=device)
    right = torch.randn(size, size, dtype=dtype, device=device)
    matmul_seconds = _best(lambda: left @ right, device, repeats)
    return Device(bandwidth=2 * source.numel() / copy_seconds, matmul_flops=2 * size**3 / matmul_seconds)


def _best(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return min(seconds)


# bitsandbytes NF4 as `--quantization bnb-4bit` loads it: 4 bits a weight and a float32 scale per
# block of 64 (no double quantization). Embeddings and the output head stay in the model's dtype.
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64


def workload_of(model: torch.nn.Module, prompt_tokens: int, harmful: int, harmless: int, new_tokens: int,
                batch_size: int, nf4: bool = False) -> Workload:  # fmt: skip
    """What a trial of `model` must do; with `nf4`, its weight bytes as bitsandbytes' 4-bit NF4
    stores them (the decode floor then reads those, as a 4-bit kernel would)."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    if nf4:
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                weight_bytes -= module.weight.numel() * (module.weight.element_size() - NF4_BYTES_PER_WEIGHT)
    return Workload(parameters, round(weight_bytes), harmful, harmless, prompt_tokens, new_tokens, batch_size)
