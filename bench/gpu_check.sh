#!/usr/bin/env bash
# One-shot GPU check (about 6 minutes on one H100/H200, compilation included): the run settings of
# the training step side by side (today's fp32 eager step against bf16 and CUDA graphs), then
# `orchestrator.train` steady epochs with the defaults. Run from the repository root:
#   bash bench/gpu_check.sh [OUTPUT_DIR]
# Each part has its own time limit, so one slow compilation cannot take the rest with it.
set -uo pipefail
out=${1:-bench-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# One inductor cache for every process of this check (what a node's trials share too).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/$out/inductor-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

bench() {  # LIMIT_S NAME MODELS SETTINGS STEPS ROUNDS
  timeout "$1" python3 bench/models_bench.py --device cuda --models "$3" --settings "$4" \
    --batch 128 --steps "$5" --rounds "$6" --json "$out/settings_$2.json" 2>&1 \
    | grep -v "^W\|Warning" | tee "$out/settings_$2.txt" || echo "($2: stopped after $1 s)"
}
# At most 6 minutes in all: 75 + 55 + 50 + 60 + 2 x 60 s.
bench 75 d20k4 d20-k4 before,bf16-none-fused,default 20 5
bench 55 d68k1 d68-k1 before,default 20 5
bench 50 wide d26-k2-w10 before,bf16-none-reference,default 10 3
bench 60 d200bn d200-k5-bn before,default 5 3

epochs() {  # LIMIT_S NAME ARCHITECTURE_FLAGS...
  local limit=$1 name=$2
  shift 2
  timeout "$limit" python3 -m orchestrator.train --dataset synthetic --device cuda "$@" \
    --train-size 51200 --test-size 2560 --epochs 3 --log-json "$out/train_$name.jsonl" 2>&1 \
    | grep "^epoch\|^error\|^done" || echo "($name: stopped after $limit s)"
}
echo "orchestrator.train, defaults (precision/compile auto), synthetic 51,200 images, batch 128:"
epochs 60 d20k4 --depth 20 --k 4
epochs 60 d68k1 --depth 68 --k 1
python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [r for f in sorted(out.glob("settings_*.json")) for r in json.loads(f.read_text())["rows"]]
print("\n| net | setting | images/s | vs before |\n| --- | --- | ---: | ---: |")
for r in rows:
    print(f"| {r['model']} | {r['setting']} | {r['images_per_s']:,.0f} | {r['speedup_vs_first']:.2f} |")
for f in sorted(out.glob("train_*.jsonl")):
    epochs = [json.loads(l) for l in f.open() if '"epoch"' in l and '"kind": "epoch"' in l]
    if epochs:
        print(f"| {f.stem[6:]} | orchestrator.train epoch {epochs[-1]['epoch']} (defaults) | "
              f"{epochs[-1]['images_per_s']:,.0f} | |")
EOF
