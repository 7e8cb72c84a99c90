#!/usr/bin/env bash
# Development: train the demo recipe with many seeds at once on one GPU and check every model.
# Each seed trains one compliant base, then one safety tune per recipe in RECIPES from that base
# (train.py --base-ckpt), and demo/check.py measures each result. One seed's first recipe is
# trained a second time from scratch to show that the run is deterministic on this machine.
#
#   bash demo/seed_sweep.sh OUT_DIR FIRST_SEED LAST_SEED
#
# Prints one line per model (refusals before the edit, per-layer removal and KL) to OUT_DIR/summary.txt.
set -uo pipefail
out=$1 first=$2 last=$3
RECIPES=${RECIPES:-"a:--s2-harmful 0.3 --s2-steps 200|b:--s2-harmful 0.4 --s2-steps 150"}
here=$(cd "$(dirname "$0")" && pwd)
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
mkdir -p "$out"

train_and_check() {  # name, seed, extra train.py args...
  local name=$1 seed=$2
  shift 2
  python3 "$here/train.py" --device cuda --seed "$seed" --out "$out/$name" "$@" >"$out/$name.log" 2>&1 &&
    python3 "$here/check.py" --device cuda --model "$out/$name" --json "$out/$name.json" --show 0 >>"$out/$name.log" 2>&1
}

one_seed() {
  local seed=$1 recipe
  IFS='|' read -ra recipes <<<"$RECIPES"
  for recipe in "${recipes[@]}"; do
    # shellcheck disable=SC2086
    train_and_check "s${seed}${recipe%%:*}" "$seed" --base-ckpt "$out/base$seed.pt" ${recipe#*:}
  done
}

for seed in $(seq "$first" "$last"); do one_seed "$seed" & done
first_recipe=${RECIPES%%|*}
# shellcheck disable=SC2086
python3 "$here/train.py" --device cuda --seed "$first" --out "$out/repeat" ${first_recipe#*:} >"$out/repeat.log" 2>&1 &
wait

python3 - "$out" "$first" "${first_recipe%%:*}" <<'PY' | tee "$out/summary.txt"
import hashlib, json, sys
from pathlib import Path
out, first, recipe = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for f in sorted(out.glob("s*.json"), key=lambda f: (int(f.stem[1:-1]), f.stem[-1])):
    r = json.loads(f.read_text())
    layers = " ".join(f"L{x['layer']} {100 * x['removed']:.0f}/{x['kl']:.2f}" for x in r["layers"])
    print(f"{f.stem:6} {r['harmful_refused']:3} {r['harmless_refused']:3} {'PASS' if r['pass'] else '    '}  {layers}")
digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else "missing"
a, b = out / f"s{first}{recipe}" / "model.safetensors", out / "repeat" / "model.safetensors"
print(f"determinism: s{first}{recipe} {digest(a)}, trained again {digest(b)}")
PY
