#!/usr/bin/env bash
# Intel AutoRound's own virtualenv for the AutoRound anchor (bench/anchors/autoround_*.py, issue 18).
# AutoRound pins its own transformers and friends, so it cannot share lowbit's environment.
# Idempotent: re-running checks the pins and installs nothing new.
#
#   LOWBIT_AUTOROUND_VENV  where the venv goes (default: ../venvs/autoround beside the repository)
#
# torch is pinned to 2.13.0 in the same pip command: with nothing pinning it, pip would pull a multi-GB
# CUDA build from PyPI; on these machines pip finds a CPU wheel of 2.13.0 on local disk (pip's
# find-links), and on others `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`
# first gives the CPU build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${LOWBIT_AUTOROUND_VENV:-$here/../../../venvs/autoround}"
AUTOROUND_VERSION="0.16.1"
TORCH_VERSION="2.13.0"
GGUF_VERSION="0.19.0"
SENTENCEPIECE_VERSION="0.2.3"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==$TORCH_VERSION" "auto-round==$AUTOROUND_VERSION" "gguf==$GGUF_VERSION" \
    "sentencepiece==$SENTENCEPIECE_VERSION"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
for p in ("auto-round", "transformers", "torch", "gguf", "sentencepiece"):
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p}: not installed")
print(f"torch CUDA build: {torch.version.cuda or 'no (CPU build)'}")
PY
echo "AutoRound venv: $(cd "$venv" && pwd)"
