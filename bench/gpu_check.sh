#!/usr/bin/env bash
# One-shot GPU check (at most 6 minutes on one H100/H200, compilation included):
#   1. the bare training step under the run settings side by side (fp32 eager "before", the
#      forms and the defaults), with each setting's warm-up (compile + CUDA-graph capture) time;
#   2. cold and warm compile times of the regional compilation (compile_scope: blocks) of the
#      deep nets: the same setting in a fresh process with an empty, then a filled, cache;
#   3. `orchestrator.train` epochs with the defaults and a checkpoint dir: the train time, train
#      + eval, and the epoch's wall time (train + eval + checkpoint: the time between two epoch
#      lines) side by side.
# Run from the repository root:
#   bash bench/gpu_check.sh [OUTPUT_DIR]         # on a GPU
#   DRY=1 bash bench/gpu_check.sh [OUTPUT_DIR]   # on a CPU: the same parts, tiny and uncompiled,
#                                                # to check the script runs (numbers mean nothing)
# Each part has its own time limit, so one slow compilation cannot take the rest with it; any
# other failure (a missing module, a crash) stops the check with a non-zero exit.
# OUTPUT_DIR gets small files only (tables, logs, JSON); the inductor cache and the checkpoints
# (the wide net's is about 555 MiB) go to a scratch folder that is removed at the end.
set -euo pipefail
out=${1:-bench-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$out"/settings_* "$out"/train_*
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
python3 -c "import pydantic, torchvision, yaml" || {
  echo "gpu_check: a dependency is missing (above); install the wheelhouse first" >&2; exit 1; }
# One inductor (and Triton) cache for every process of this check, as a node's trials share one:
# its own, empty, so that "cold" means cold (a cache you set is used, and kept).
if [[ -z ${TORCHINDUCTOR_CACHE_DIR:-} ]]; then
  export TORCHINDUCTOR_CACHE_DIR=$scratch/inductor-cache TRITON_CACHE_DIR=$scratch/triton-cache
else
  echo "TORCHINDUCTOR_CACHE_DIR is set: the 'cold' compile times below may be warm"
fi

dry=${DRY:-0}
if [[ $dry == 1 ]]; then  # CPU, tiny, uncompiled: the script's plumbing only
  device=cpu batch=4 test_size=8 limit_scale=4
  echo "DRY=1: CPU, batch $batch, no compilation; the numbers mean nothing"
else
  device=cuda batch=128 test_size=10000 limit_scale=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch; print('torch', torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

limited() {  # NAME LIMIT_S LOG COMMAND...: a time limit stops the part, any other error the check
  local name=$1 limit=$2 log=$3 rc=0
  shift 3
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  if [[ $rc == 124 ]]; then
    echo "($name: stopped after $limit s)"
  elif [[ $rc != 0 ]]; then
    tail -n 20 "$log" >&2
    echo "gpu_check: $name failed (exit $rc); its log: $log" >&2
    exit "$rc"
  fi
}
bench() {  # LIMIT_S NAME MODEL SETTINGS STEPS ROUNDS
  local limit=$(($1 * limit_scale)) settings=$4 steps=$5 rounds=$6
  if [[ $dry == 1 ]]; then settings=${settings//cudagraphs/none} steps=1 rounds=1; fi
  limited "$2" "$limit" "$out/settings_$2.log" python3 bench/models_bench.py --device "$device" \
    --models "$3" --settings "$settings" --batch "$batch" --steps "$steps" --rounds "$rounds" \
    --json "$out/settings_$2.json"
  grep -v "^W\|Warning" "$out/settings_$2.log" > "$out/settings_$2.txt" || true
  cat "$out/settings_$2.txt"
  rm "$out/settings_$2.log"
}
epochs() {  # LIMIT_S NAME TRAIN_SIZE EPOCHS ARCHITECTURE_FLAGS...
  local limit=$(($1 * limit_scale)) name=$2 size=$3 n=$4
  shift 4
  if [[ $dry == 1 ]]; then size=16 n=3; fi
  echo "$size $batch" > "$out/train_$name.size"
  # Each output line stamped with the time it appeared: an epoch line is printed before its
  # checkpoint is written, so two consecutive stamps span checkpoint + train + eval.
  limited "$name" "$limit" "$out/train_$name.txt" bash -o pipefail -c '"$@" 2>&1 | python3 -c "
import sys, time
for line in sys.stdin: print(f\"{time.time():.3f} {line}\", end=\"\", flush=True)"' _ \
    python3 -m orchestrator.train --dataset synthetic --device "$device" "$@" \
    --train-size "$size" --test-size "$test_size" --epochs "$n" --batch-size "$batch" \
    --log-json "$out/train_$name.jsonl" --checkpoint-dir "$scratch/ckpt_$name"
  rm -rf "$scratch/ckpt_$name"
  grep " epoch \| error" "$out/train_$name.txt" | cut -d' ' -f2- || true
}

# 1. Bare steps. The wide net: bf16 eager and CUDA graphs in both forms (its default is the
#    reference form since issue 23).                                            75 + 75 = 150 s
bench 75 d20k4 d20-k4 before,default 20 5
bench 75 wide d26-k2-w10 bf16-none-reference,bf16-cudagraphs-fused,default 10 3
# 2. Regional compilation, cold (empty cache) then warm (the same graphs, a new process):
#    pre-resnet-68 (whole-model compile: > 41 s on 2026-11-27), the 200-layer bottleneck net.
#                                                                         45 + 25 + 55 = 125 s
bench 45 d68-cold d68-k1 bf16-cudagraphs-reference-blocks 20 3
bench 25 d68-warm d68-k1 bf16-cudagraphs-reference-blocks 20 3
bench 55 d200bn-cold d200-k5-bn bf16-cudagraphs-fused-blocks 5 2
# 3. Epochs with the defaults (d68 regional, warm from part 2), checkpoints as `auto` decides,
#    10,000 test images.                                                    30 + 25 + 30 = 85 s
echo "orchestrator.train, synthetic data, batch $batch, $test_size test images, checkpoint dir:"
epochs 30 d20k4 51200 5 --depth 20 --k 4
epochs 25 d68k1 51200 4 --depth 68 --k 1 --compile-scope blocks
epochs 30 wide 19200 4 --depth 26 --k 2 --width 10

python3 - "$out" <<'SUMMARY'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\n| net | setting | images/s | vs first | warm-up (compile) s |")
print("| --- | --- | ---: | ---: | ---: |")
for f in sorted(out.glob("settings_*.json")):
    for r in json.loads(f.read_text())["rows"]:
        print(f"| {r['model']} ({f.stem[9:]}) | {r['setting']} | {r['images_per_s']:,.0f} | "
              f"{r['speedup_vs_first']:.2f} | {r['warmup_s']:.1f} |")
print("\n| run | epoch | images/s | train s | train + eval s | wall s (+ checkpoint) | "
      "wall / train |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in sorted(out.glob("train_*.jsonl")):
    name = f.stem[6:]
    size, batch = map(int, (out / f"train_{name}.size").read_text().split())
    epochs = [json.loads(line) for line in f.open() if '"kind": "epoch"' in line]
    stamps = [float(line.split()[0]) for line in (out / f"train_{name}.txt").open()
              if line.split()[1:2] == ["epoch"]]
    for i, e in enumerate(epochs):
        train = size // batch * batch / e["images_per_s"]
        # From the previous epoch line to this one: the previous checkpoint (if any) and this
        # epoch's training and evaluation.
        wall = stamps[i] - stamps[i - 1] if 0 < i < len(stamps) else math.nan
        print(f"| {name} | {e['epoch']} | {e['images_per_s']:,.0f} | {train:.2f} | "
              f"{e['epoch_time_s']:.2f} | {wall:.2f} | {wall / train:.2f} |")
SUMMARY
