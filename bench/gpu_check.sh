#!/usr/bin/env bash
# One-shot GPU check: fused-vs-reference equivalence on CUDA, the execution-form benchmark, and a
# short synthetic training run on the GPU. Run from the repository root on a CUDA machine:
#   bash bench/gpu_check.sh [OUTPUT_DIR]
set -uo pipefail
out=${1:-bench-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k "fused and cuda" 2>&1 | tail -3
python3 bench/models_bench.py --device cuda --models d20-k4,d110-k1,d26-k2-w10,d200-k5-bn \
  --batch 128 --steps 10 --rounds 5 --json "$out/forms_b128.json" 2>&1 | tee "$out/forms_b128.txt"
python3 bench/models_bench.py --device cuda --models d20-k4,d110-k4 --batch 32 --steps 10 \
  --rounds 5 --json "$out/forms_b32.json" 2>&1 | tee "$out/forms_b32.txt"
python3 -m orchestrator.train --dataset synthetic --device cuda --depth 20 --k 4 --epochs 2 \
  --train-size 4096 --test-size 1024 --log-json "$out/train.jsonl" 2>&1 | tail -3
