"""The trial floor of benchmarks/floor.py: what a trial's hardware time is bounded by."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

spec = importlib.util.spec_from_file_location(
    "floor", Path(__file__).resolve().parents[1] / "benchmarks" / "floor.py"
)
floor = importlib.util.module_from_spec(spec)
sys.modules["floor"] = floor  # dataclasses look their module up
spec.loader.exec_module(floor)


def test_the_floor_of_a_7b_trial_on_an_h200():
    # The arithmetic: 15 GB of weights read per decode step at 4.8 TB/s, 100 prompts in
    # batches of 64 (two batches) of 64 tokens: 128 steps.
    work = floor.Workload(parameters=7_600_000_000, weight_bytes=15_200_000_000, harmful_prompts=100,
                          harmless_prompts=100, prompt_tokens=40, new_tokens=64, batch_size=64)  # fmt: skip
    device = floor.Device(bandwidth=4.8e12, matmul_flops=7.9e14)
    result = floor.trial_floor(work, device)
    assert result.decode == pytest.approx(128 * 15.2e9 / 4.8e12)  # 0.405 s
    assert result.prefill == pytest.approx(2 * 7.6e9 * 100 * 40 / 7.9e14)  # 0.077 s
    assert result.kl == result.prefill  # as many harmless prompts as harmful, of the same length
    assert result.total == pytest.approx(result.decode + result.prefill + result.kl)
    # All prompts in one batch: half the decode steps.
    one_batch = floor.trial_floor(floor.Workload(**{**work.__dict__, "batch_size": 128}), device)
    assert one_batch.decode == pytest.approx(result.decode / 2)


def test_a_models_workload_counts_every_weight_once():
    model = tiny_model("llama").to(torch.bfloat16)
    work = floor.workload_of(model, prompt_tokens=12, harmful=10, harmless=8, new_tokens=4, batch_size=4)
    parameters = sum(p.numel() for p in model.parameters())
    assert work.parameters == parameters and work.weight_bytes == 2 * parameters
    assert (work.harmful_prompts, work.harmless_prompts, work.batch_size) == (10, 8, 4)


def test_a_4bit_workload_reads_the_layers_matrices_at_nf4_bytes_and_the_rest_as_they_are():
    model = tiny_model("llama").to(torch.bfloat16)
    full = floor.workload_of(model, prompt_tokens=12, harmful=10, harmless=8, new_tokens=4, batch_size=4)
    nf4 = floor.workload_of(
        model, prompt_tokens=12, harmful=10, harmless=8, new_tokens=4, batch_size=4, nf4=True
    )
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    assert 0 < linear < full.parameters
    assert nf4.parameters == full.parameters  # the matrix work is the same
    assert nf4.weight_bytes == round(full.weight_bytes - linear * (2 - 0.5625))


def test_the_device_is_measured_not_assumed():
    measured = floor.measure_device(torch.device("cpu"), dtype=torch.float32, repeats=2)
    assert measured.bandwidth > 1e8 and measured.matmul_flops > 1e8
