#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite.
#   - installs Debian's redis-server when missing (root only; the Redis tier tests start their own server)
#   - extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (Debian) for the Redis tier tests ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server is not installed; the Redis tier tests will be skipped" >&2
  fi
fi
scripts/setup.sh dev redis codecs
exec .venv/bin/python -m pytest "$@"
