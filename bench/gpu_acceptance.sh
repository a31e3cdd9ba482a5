#!/usr/bin/env bash
# The acceptance run of a freshly lent or rented GPU machine without internet, in one command,
# from the repository root (the pieces made by bench/wheelhouse.sh on a connected machine):
#   bash bench/gpu_acceptance.sh PIECES_DIR [OUT]         # on the GPU machine
#   DRY=1 bash bench/gpu_acceptance.sh [PIECES_DIR] [OUT] # on a CPU: every step, tiny; without
#                                                         # pieces, in the current environment
# Steps; the first that fails stops the run, named, with a non-zero exit and its log's tail:
#   install    pieces checked (SHA256SUMS), unpacked, installed offline (pip --no-index) into a
#              venv that keeps the image's torch (--system-site-packages)
#   deps       every module the project and the checks import
#   gpu_check  bench/gpu_check.sh: thin, deep and wide nets, epoch against bare step, cold and
#              warm regional compilation
#   sweep      a Ray Tune sweep of a small real-CIFAR study (search_spaces/cifar_cpu.yaml at depth
#              8, k 1 and 2: two trials), one GPU per trial
#   mesh       bp=2 x dp=1, two ranks sharing one GPU (NCCL probed; gloo otherwise)
#   decode     --decode device against the workers' decode, bit for bit, on generated JPEGs
# Results: OUT (default acceptance-<UTC time>.tgz): each step's log and tables, small files only.
# Environment: CIFAR_DIR (a folder with cifar-10-batches-py/; default: from the pieces; with DRY=1
# and none, the sweep uses synthetic data), EPOCHS (2), STEPS (the steps to run,
# e.g. "install deps mesh"; default all).
set -euo pipefail
pieces=${1:-}
archive=${2:-acceptance-$(date -u +%Y%m%dT%H%M%SZ).tgz}
dry=${DRY:-0}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-acceptance.XXXXXX")
results=$work/results
mkdir -p "$results"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
device=cuda
[[ $dry == 1 ]] && device=cpu

run_step() {  # NAME FUNCTION: the function under set -e, its output in results/NAME.log
  local name=$1 rc=0
  shift
  if [[ " ${STEPS:-$name} " != *" $name "* ]]; then return 0; fi
  echo "== $name"
  ( set -euo pipefail; "$@" ) > "$results/$name.log" 2>&1 &
  wait $! || rc=$?
  if [[ $rc != 0 ]]; then
    tail -n 25 "$results/$name.log" >&2
    echo "gpu_acceptance: step $name failed (exit $rc); log: $results/$name.log" >&2
    pack
    exit "$rc"
  fi
  tail -n 3 "$results/$name.log"
}

pack() {  # the results so far, whatever happened
  tar -C "$work" -czf "$archive" results && echo "results: $archive"
}

install() {
  if [[ -z $pieces ]]; then
    [[ $dry == 1 ]] || { echo "no PIECES_DIR given (bench/wheelhouse.sh makes it)"; return 1; }
    echo "DRY=1 without pieces: the current environment"
    return 0
  fi
  (cd "$pieces" && sha256sum -c --quiet SHA256SUMS)
  mkdir -p "$work/wheelhouse"
  cat "$pieces"/wheelhouse.tar.* | tar -C "$work/wheelhouse" -xf -
  python3 -m venv --system-site-packages "$work/venv"
  "$work/venv/bin/python" -m pip install --quiet --no-index \
    --find-links "$work/wheelhouse/wheels" -r "$work/wheelhouse/requirements.txt"
  if [[ -s $work/wheelhouse/cifar-10-python.tar.gz && -z ${CIFAR_DIR:-} ]]; then
    mkdir -p "$work/cifar" && tar -C "$work/cifar" -xzf "$work/wheelhouse/cifar-10-python.tar.gz"
  fi
}

deps() {
  python3 -c "import pydantic, yaml, psutil, PIL, torch, torchvision, ray, ray.train, ray.tune, \
mlflow, optuna, pandas; print('torch', torch.__version__, 'ray', ray.__version__, \
'mlflow', mlflow.__version__, 'cuda', torch.cuda.is_available())"
  [[ $dry == 1 ]] || python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'"
  [[ $dry == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

gpu_check() {
  DRY=$dry bash bench/gpu_check.sh "$results/gpu_check"
}

sweep() {
  local data=(--set train.dataset=synthetic) epochs=${EPOCHS:-2}
  if [[ -n $cifar ]]; then
    data=(--data-dir "$cifar")
  elif [[ $dry != 1 ]]; then
    echo "no CIFAR-10: give CIFAR_DIR or pieces made with CIFAR=1"
    return 1
  fi
  local sizes=()
  [[ $dry == 1 ]] && sizes=(--set train.train_size=256 --set train.test_size=128) epochs=1
  python3 -m orchestrator.sweep search_spaces/cifar_cpu.yaml "${data[@]}" "${sizes[@]}" \
    --set "train.device=$device" --set "resources.gpus_per_worker=$([[ $dry == 1 ]] && echo 0 || echo 1)" \
    --set space.depth=8 --set "train.epochs=$epochs" --set name=gpu_acceptance \
    --storage-path "$work/ray-results" --tracking-uri "sqlite:///$results/mlflow.db"
}

mesh() { python3 bench/acceptance_checks.py mesh --device "$device"; }
decode() { python3 bench/acceptance_checks.py decode --device "$device"; }

run_step install install
if [[ -d $work/venv ]]; then
  export PATH=$work/venv/bin:$PATH
fi
cifar=${CIFAR_DIR:-}
[[ -z $cifar && -d $work/cifar/cifar-10-batches-py ]] && cifar=$work/cifar
[[ -z $cifar && -n ${MULTIRES_CIFAR10_DIR:-} ]] && cifar=$MULTIRES_CIFAR10_DIR
run_step deps deps
run_step gpu_check gpu_check
run_step sweep sweep
run_step mesh mesh
run_step decode decode
pack
