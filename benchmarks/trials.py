"""Trial time of abliterate and heretic-llm 1.4.0, side by side, on the same GPU in the same run.

Both tools get the same model folder, the same four prompt files (our built-in sets), batch size,
response length, dtype, system prompt, row normalization (none), seed and number of trials (all
random start-up trials, so the sampler costs the same). Each runs as its own process:

- abliterate through its command line; per-phase times come from each trial's `seconds` record;
- heretic through `heretic_timed.py`, which calls heretic's own entry point with timers around its
  reset, edit, KL and refusal methods (heretic is configured by its config.toml only, not changed);
- `ours-4bit`: abliterate on the same model loaded in 4-bit NF4 (`--quantization bnb-4bit`), edited
  through the rank-1 adapter, with the compiled decoder (`--compile auto`); `ours-4bit-eager`
  without it. Their floor reads the weights' 4-bit bytes;
- `ours` generates without the compiled decoder (`--compile false`), `ours-compile` with it
  (`--compile true`: a static KV cache whose decoding step is compiled into CUDA graphs). The
  compile happens while the original model's refusals are counted, before the first trial; the
  wall time of the whole run, printed beside the trial times, includes it.

Per trial: reset, edit, refusal generation, KL, and the total wall time of the trial as Optuna
recorded it (start to finish, sampler included). Then what a user waits for: a default study of
200 trials, scaled from the run (its time outside the trials plus 200 median trials). Models: the
demo model, and models shaped as Qwen2.5-7B (`7b`), Qwen2.5-32B (`32b`, 65 GB on disk), Qwen2.5-0.5B
(`0.5b`) or SmolLM2-135M (`135m`) with random weights saved to local disk (shape is what costs time; random
weights never say a refusal marker or end-of-sequence, so both tools generate every response to
full length there).

    PYTHONPATH=src:/tmp/site python3 benchmarks/trials.py --workdir /tmp/bench --models demo,7b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import torch
import transformers
from floor import Device, Floor, measure_device, trial_floor, workload_of

from abliterate.compiled import users_environment
from abliterate.judge import default_refusal_markers
from abliterate.model import demo_model_path
from abliterate.storage import folder_storage_url, open_storage

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "data" / "prompts"
SYSTEM_PROMPT = "You are a helpful assistant."
STUDY_TRIALS = 200  # what the whole-study line scales to: a default study
# Real architectures' shapes, with random weights: shape is what costs time.
SHAPES = {
    "7b": (transformers.Qwen2Config, dict(  # Qwen2.5-7B
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096)),
    "32b": (transformers.Qwen2Config, dict(  # Qwen2.5-32B: 65 GB of bf16 weights, saved to --workdir
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=4096)),
    "0.5b": (transformers.Qwen2Config, dict(  # Qwen2.5-0.5B
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)),
    "135m": (transformers.LlamaConfig, dict(  # SmolLM2-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)),
}  # fmt: skip


def prepare_model(name: str, workdir: Path) -> Path:
    folder = workdir / f"model-{name}"
    if folder.exists():
        return folder
    if name == "demo":
        shutil.copytree(demo_model_path(), folder)
        return folder
    # The demo tokenizer (it has a chat template), padded with placeholder tokens to the real vocabulary,
    # so that random logits over 152k ids decode to text.
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_model_path())
    config_class, shape = SHAPES[name]
    tokenizer.add_tokens([f"<r{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    config = config_class(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


class PeakDeviceMemory:
    """The most device memory in use while the block runs (every process, as nvidia-smi counts it),
    above what was in use when it began; sampled every 50 ms from the driver."""

    def __enter__(self) -> PeakDeviceMemory:
        self.baseline = self.peak = self._in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return (self.peak - self.baseline) / 1024**3

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._in_use())

    @staticmethod
    def _in_use() -> int:
        if not torch.cuda.is_available():
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free


# Our variants: in place from a GPU cache at full precision; 4-bit weights through the adapter.
# "ours" generates without the compiled decoder, as every release did before `--compile auto`.
OUR_FLAGS = {
    "ours": ["--reset", "gpu-cache", "--compile", "false"],
    "ours-4bit": ["--reset", "adapter", "--quantization", "bnb-4bit"],
    "ours-4bit-eager": ["--reset", "adapter", "--quantization", "bnb-4bit", "--compile", "false"],
    "ours-compile": ["--reset", "gpu-cache", "--compile", "true"],
}


def run_ours(model: Path, workdir: Path, args, tool: str = "ours") -> list[dict]:
    # Every trial generates (--skip-dominated false): random weights never refuse, so after the first
    # trial without refusals every trial would skip its generation and time nothing.
    output = workdir / f"{tool}-{model.name}"
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "-m", "abliterate", "--model", str(model), "--output", str(output),
        "--dtypes", "bfloat16", "--batch-size", str(args.batch_size), "--max-response-length", str(args.max_response_length),
        "--n-trials", str(args.trials), "--n-startup-trials", str(args.trials), "--seed", "0",
        "--system-prompt", SYSTEM_PROMPT, "--row-norm", "none", "--select", "none", "--skip-dominated", "false",
        *OUR_FLAGS[tool],
    ]  # fmt: skip
    # The console goes through, and is read for the batch size that `--batch-size 0` chose. Each run
    # compiles into its own folder: a cache that one run filled in /tmp would shorten the next one's.
    environment = users_environment()
    run = subprocess.run(
        command, check=True, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment
    )
    sys.stderr.write(run.stderr)
    chosen = re.search(r"batch size (\d+)", run.stderr)
    args.chosen_batch_size = args.chosen_batch_size or (int(chosen.group(1)) if chosen else None)
    storage = open_storage(folder_storage_url(output))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    rows = []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        seconds = trial.user_attrs["seconds"]
        rows.append({**seconds, "total": trial.duration.total_seconds(), "refusal_count": trial.values[0]})
    return rows


def heretic_config(model: Path, args) -> str:
    prompt_sets = {
        "good_prompts": "harmless_train", "bad_prompts": "harmful_train",
        "good_evaluation_prompts": "harmless_eval", "bad_evaluation_prompts": "harmful_eval",
    }  # fmt: skip
    lines = [
        f'model = "{model}"', 'dtypes = ["bfloat16"]', 'device_map = "auto"',
        f"batch_size = {args.batch_size}", f"max_response_length = {args.max_response_length}",
        'response_prefix = ""', f"n_trials = {args.trials}", f"n_startup_trials = {args.trials}", "seed = 0",
        'study_checkpoint_dir = "checkpoints"', f'system_prompt = "{SYSTEM_PROMPT}"', 'row_normalization = "none"',
        f"refusal_markers = {json.dumps(default_refusal_markers())}",
    ]  # fmt: skip
    for table, file in prompt_sets.items():
        lines += ["", f"[{table}]", f'dataset = "{PROMPTS / (file + ".txt")}"']
    return "\n".join(lines) + "\n"


def run_heretic(model: Path, workdir: Path, args) -> list[dict]:
    folder = workdir / f"heretic-{model.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(heretic_config(model, args))
    timings = folder / "timings.jsonl"
    wrapper = Path(__file__).with_name("heretic_timed.py")
    subprocess.run(
        [sys.executable, str(wrapper), str(timings)], check=True, cwd=folder, stdin=subprocess.DEVNULL
    )
    phases: dict[int, dict[str, float]] = {}
    for line in timings.read_text().splitlines():
        record = json.loads(line)
        if record["trial"] > 0:  # calls before the first reset belong to the baseline
            entry = phases.setdefault(record["trial"], {})
            entry[record["phase"]] = entry.get(record["phase"], 0.0) + record["s"]
    (journal,) = (folder / "checkpoints").glob("*.jsonl")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="heretic", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    rows = []
    for index, trial in enumerate(trials, start=1):
        timed = phases.get(index, {})
        rows.append({
            "reset": timed.get("reset", 0.0), "edit": timed.get("edit", 0.0), "kl": timed.get("kl_logprobs", 0.0),
            "refusals": timed.get("refusals", 0.0), "total": trial.duration.total_seconds(),
            "refusal_count": trial.values[1] if len(trial.values) > 1 else None,
        })  # fmt: skip
    return rows


def model_floor(folder: Path, args, device: Device, nf4: bool = False) -> Floor:
    """The floor of one trial of this model (see floor.py): its parameters counted on the meta device;
    with `nf4`, its weights read as 4-bit NF4."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    harmful = (PROMPTS / "harmful_eval.txt").read_text().splitlines()[:100]
    messages = [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}] for p in harmful
    ]
    # Text first, then tokens: transformers 5's tokenize=True returns a BatchEncoding, whose len() is 2.
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    work = workload_of(model, round(statistics.mean(lengths)), len(harmful), len(harmful), args.max_response_length,
                       args.batch_size or args.chosen_batch_size or len(harmful), nf4=nf4)  # fmt: skip
    return trial_floor(work, device)


def floor_of(floors: dict[str, Floor], model: str, tool: str) -> Floor:
    return floors[f"{model}, 4-bit NF4" if tool.startswith("ours-4bit") else model]


def summary(rows: list[dict], skip_first: bool) -> dict[str, float]:
    rows = rows[1:] if skip_first and len(rows) > 1 else rows  # the first trial also warms up kernels
    return {
        key: statistics.median(row[key] for row in rows)
        for key in ("reset", "edit", "refusals", "kl", "total")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--models", default="demo,7b")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="0: each tool's own choice from free memory"
    )
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument(
        "--tools",
        default="ours,heretic",
        help="ours, ours-compile, ours-4bit, ours-4bit-eager (bitsandbytes NF4), heretic",
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # heretic's default, for both
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[variable] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"settings: {args.trials} trials, batch {args.batch_size}, {args.max_response_length} new tokens, bf16, "
          "400+400 train / 100+100 eval prompts")  # fmt: skip
    device = measure_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"measured: {device.bandwidth / 1e9:.0f} GB/s copy bandwidth, {device.matmul_flops / 1e12:.0f} TFLOP/s bf16 matmul"
    )
    results, floors = {}, {}
    for name in args.models.split(","):
        model = prepare_model(name, args.workdir)
        args.chosen_batch_size = None  # with --batch-size 0: what the first of our runs chose
        for tool in args.tools.split(","):
            started = time.perf_counter()
            with PeakDeviceMemory() as memory:
                if tool == "heretic":
                    rows = run_heretic(model, args.workdir, args)
                else:
                    rows = run_ours(model, args.workdir, args, tool)
            wall = time.perf_counter() - started
            results[(name, tool)] = {
                **summary(rows, skip_first=True),
                "peak_gib": memory.gib,
                "wall": wall,
                "outside_trials": wall - sum(row["total"] for row in rows),
            }
            print(
                json.dumps(
                    {"model": name, "tool": tool, "peak_gib": memory.gib, "wall_s": wall, "trials": rows}
                ),
                flush=True,
            )
        floors[name] = model_floor(model, args, device)
        if any(tool.startswith("ours-4bit") for tool in args.tools.split(",")):
            floors[f"{name}, 4-bit NF4"] = model_floor(model, args, device, nf4=True)
        if not args.batch_size:
            print(f"{name}: --batch-size 0 chose {args.chosen_batch_size} (the floor's batch)")
    print(
        "\nmedian per trial (first trial excluded), seconds; peak GPU memory and wall time of the whole run:"
    )
    print(
        "| model | tool | reset | edit | refusal generation | KL | trial total | x ours | x floor | peak GPU | run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, tool), row in results.items():
        ours = results.get((name, "ours"))
        ratio = f"{row['total'] / ours['total']:.2f}x" if ours and tool != "ours" else ""
        print(f"| {name} | {tool} | {row['reset']:.4f} | {row['edit']:.4f} | {row['refusals']:.3f} | {row['kl']:.3f} | "
              f"{row['total']:.3f} | {ratio} | {row['total'] / floor_of(floors, name, tool).total:.1f}x | {row['peak_gib']:.1f} GiB | "
              f"{row['wall']:.0f} s |")  # fmt: skip
    print(
        f"\na whole study of {STUDY_TRIALS} trials, scaled from this run: its time outside the trials (load, "
        f"directions, the original's count, compiles) + {STUDY_TRIALS} x the median trial; saving the model not included:"
    )
    print("| model | tool | outside the trials | median trial | whole study |")
    print("|---|---|---|---|---|")
    for (name, tool), row in results.items():
        whole = row["outside_trials"] + STUDY_TRIALS * row["total"]
        print(
            f"| {name} | {tool} | {row['outside_trials']:.0f} s | {row['total']:.3f} s | {whole / 60:.1f} min |"
        )
    print(
        "\nthe floor of a trial (benchmarks/floor.py: decode steps x weight bytes / bandwidth, plus prefill and KL"
    )
    print("FLOPs, 2 x parameters x prompt tokens, / matmul throughput), seconds:")
    print("| model | decode | prefill | KL | floor |")
    print("|---|---|---|---|---|")
    for name, floor in floors.items():
        print(f"| {name} | {floor.decode:.4f} | {floor.prefill:.4f} | {floor.kl:.4f} | {floor.total:.4f} |")


if __name__ == "__main__":
    main()
