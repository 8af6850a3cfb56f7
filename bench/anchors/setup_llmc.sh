#!/usr/bin/env bash
# llm-compressor's own virtualenv for the GPTQ/AWQ anchor (bench/gptq_awq.py, bench/anchors/llmc_*.py).
# llm-compressor pins its own transformers (<=5.17) and compressed-tensors (==0.19), so it cannot share
# lowbit's environment. Idempotent: re-running checks the pins and installs nothing new.
#
#   LOWBIT_LLMC_VENV  where the venv goes (default: ../venvs/llmc beside the repository)
#
# torch is pinned to 2.13.0 in the same pip command: with nothing pinning it, llm-compressor's range
# (torch>=2.10,<=2.14) would pull a multi-GB CUDA build from PyPI; on these machines pip finds a CPU wheel
# of 2.13.0 on local disk (pip's find-links), and on others `pip install torch==2.13.0
# --index-url https://download.pytorch.org/whl/cpu` first gives the CPU build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${LOWBIT_LLMC_VENV:-$here/../../../venvs/llmc}"
LLMC_VERSION="0.14.0.1"
TORCH_VERSION="2.13.0"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==$TORCH_VERSION" "llmcompressor==$LLMC_VERSION"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
for p in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
    print(f"{p}=={md.version(p)}")
print(f"torch CUDA build: {torch.version.cuda or 'no (CPU build)'}")
EOF
echo "llm-compressor venv: $(cd "$venv" && pwd)"
