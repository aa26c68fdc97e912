#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the oracle wheels that the GPU machine's image lacks or
# holds in another version, so that benchmarks/gpu_run.sh can install them there without a
# network:
#
#     bash benchmarks/fetch_wheels.sh      # -> .whl/ (ignored by git, about 36 MB)
#
# then name `.whl` in the device call's `carry`. gpu_run.sh installs whatever lies in .whl/ into
# a folder of its own, ahead of the image's packages on PYTHONPATH.
#
# What and why (the image as the device tool's KINDS.md lists it, read 2026-11-17: Python 3.12,
# torch 2.11, transformers 5.17, timm, safetensors, scikit-learn, tqdm, matplotlib; no POT):
# - POT, the Sinkhorn and IPOT oracle, is not in the image at all;
# - timm is, in a version nobody here has read; the timm oracle tests were written against
#   1.0.31 (the version the README's test command installs), so that one travels.
# Both need only what the image already has (numpy, scipy; torch, torchvision, pyyaml,
# huggingface_hub, safetensors), so they are fetched without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=("POT==0.9.7.post1" "timm==1.0.31")
mkdir -p .whl
# pip matches a manylinux tag exactly, so every tag a wheel may carry is named
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
