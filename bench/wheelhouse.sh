#!/usr/bin/env bash
# On a machine with internet: what a fresh GPU machine without internet needs for
# bench/gpu_acceptance.sh, packed as one tar split into pieces: wheels of the project's
# dependencies that a GPU image lacks (every dependency in pyproject.toml but torch and
# torchvision, with their own dependencies) for that machine's Python and platform, and CIFAR-10.
#   bash bench/wheelhouse.sh OUT_DIR             # download, pack into OUT_DIR/pieces/
#   bash bench/wheelhouse.sh --dry-run OUT_DIR   # resolve only (PyPI metadata, no wheels):
#                                                # OUT_DIR/resolved.txt lists what would come
#   bash bench/wheelhouse.sh --list              # the requirements and the pip command; no network
# Environment: PYTHON_VERSION (3.12), PLATFORMS (manylinux 2.17 to 2.28, x86_64), PIECE_MIB (64),
# CIFAR (1: download CIFAR-10's python archive; or CIFAR_TGZ=path of one you have; 0: none).
# Carry OUT_DIR/pieces/ to the GPU machine; bench/gpu_acceptance.sh checks and installs it.
set -euo pipefail
mode=pack
case ${1:-} in
  --dry-run) mode=dry; shift ;;
  --list) mode=list; shift ;;
esac
python_version=${PYTHON_VERSION:-3.12}
platforms=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
piece_mib=${PIECE_MIB:-64}
cifar_url=https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
repo=$(cd "$(dirname "$0")/.." && pwd)

requirements() {  # pyproject's dependencies, less what a GPU image has (torch, torchvision)
  python3 - "$repo/pyproject.toml" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[\[<>=!~ ;]", d)[0] not in ("torch", "torchvision")))
PY
}
pip_target=(--only-binary=:all: --python-version "$python_version" --implementation cp
            --abi "cp${python_version/./}")
for p in $platforms; do pip_target+=(--platform "$p"); done

if [[ $mode == list ]]; then
  requirements
  echo "# pip download -d OUT_DIR/wheels ${pip_target[*]} -r requirements.txt"
  exit 0
fi
out=${1:?usage: bash bench/wheelhouse.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
requirements > "$out/requirements.txt"
if [[ $mode == dry ]]; then
  python3 -m pip install --dry-run --ignore-installed --quiet --report "$out/report.json" \
    --target "$out/.dry-target" "${pip_target[@]}" -r "$out/requirements.txt"
  python3 -c 'import json, sys
for i in json.load(open(sys.argv[1]))["install"]:
    print(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"].rsplit("/", 1)[-1])' \
    "$out/report.json" > "$out/resolved.txt"
  rm -rf "$out/.dry-target"
  echo "$(wc -l < "$out/resolved.txt") wheels would be downloaded; listed in $out/resolved.txt"
  exit 0
fi
python3 -m pip download --quiet -d "$out/wheels" "${pip_target[@]}" -r "$out/requirements.txt"
if [[ -n ${CIFAR_TGZ:-} ]]; then
  cp "$CIFAR_TGZ" "$out/cifar-10-python.tar.gz"
elif [[ ${CIFAR:-1} == 1 && ! -s $out/cifar-10-python.tar.gz ]]; then
  curl -fL --retry 3 -o "$out/cifar-10-python.tar.gz" "$cifar_url"
fi
rm -rf "$out/pieces"
mkdir "$out/pieces"
contents=(wheels requirements.txt)
[[ -s $out/cifar-10-python.tar.gz ]] && contents+=(cifar-10-python.tar.gz)
tar -C "$out" -cf - "${contents[@]}" | split -b "${piece_mib}M" -d -a 3 - "$out/pieces/wheelhouse.tar."
(cd "$out/pieces" && sha256sum wheelhouse.tar.* > SHA256SUMS)
echo "$(ls "$out/wheels" | wc -l) wheels, $(ls "$out/pieces" | grep -c tar) pieces of at most" \
  "$piece_mib MiB in $out/pieces ($(du -sh "$out/pieces" | cut -f1))"
