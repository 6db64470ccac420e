#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite.
#   - installs Debian's redis-server and redis-tools (redis-cli) when missing (root only; the Redis tier
#     tests start their own server, and their own 3-master Redis Cluster with redis-cli --cluster create)
#   - extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
#   - then sets up .venv-sglang (scripts/setup_sglang.sh: SGLang 0.5.23 on the CPU torch, transformers 5.19)
#     and runs tests/sglang with it; KDN_SKIP_SGLANG=1 skips that part
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server and redis-tools (Debian) for the Redis tier tests ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "warning: redis-server / redis-cli are not installed; the Redis tier tests will be skipped" >&2
  fi
fi
scripts/setup.sh dev redis codecs
.venv/bin/python -m pytest "$@"
if [ "${KDN_SKIP_SGLANG:-0}" != 1 ]; then
  scripts/setup_sglang.sh
  .venv-sglang/bin/python -m pytest tests/sglang -p no:cacheprovider
fi
