"""Try demo-model recipes side by side: train each variant, check it, print one table.

Development only (the shipped model comes from a plain `demo/train.py` run; demo/NOTES.md). Each
variant is a name and extra `train.py` arguments; variants run in parallel processes, each
trained and then measured by `check.py`:

    python demo/sweep.py --device cuda --jobs 8 --out /tmp/sweep \\
        "base=" "steps1500=--s1-steps 1500" "8layers=--layers 8"

Prints, per variant, the refusal rates before the edit and, per layer, the share of refusals
that the layer's direction removes and the KL it costs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_variant(name: str, train_args: str, out: Path, device: str, threads: int) -> dict:
    folder = out / name
    log = out / f"{name}.log"
    train = [sys.executable, str(HERE / "train.py"), "--out", str(folder), "--device", device]
    train += ["--threads", str(threads), *shlex.split(train_args)]
    check = [sys.executable, str(HERE / "check.py"), "--model", str(folder), "--device", device]
    check += ["--threads", str(threads), "--json", str(out / f"{name}.json"), "--show", "0"]
    with open(log, "w") as f:
        for cmd in (train, check):
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    result_file = out / f"{name}.json"
    return json.loads(result_file.read_text()) if result_file.exists() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=TRAIN_ARGS")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v.split("=", 1) for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            name: pool.submit(run_variant, name, train_args, args.out, args.device, args.threads)
            for name, train_args in variants
        }
        results = {name: f.result() for name, f in futures.items()}

    width = max(len(name) for name, _ in variants)
    print(f"{'variant':<{width}}  harmful  harmless  per-layer removed% / KL")
    for name, _ in variants:
        r = results[name]
        if not r:
            print(f"{name:<{width}}  failed (see {args.out / name}.log)")
            continue
        layers = "  ".join(f"L{x['layer']} {100 * x['removed']:.0f}/{x['kl']:.2f}" for x in r["layers"])
        print(f"{name:<{width}}  {r['harmful_refused']:>7}  {r['harmless_refused']:>8}  {layers}")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
