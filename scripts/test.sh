#!/usr/bin/env bash
# Fresh machine -> the whole test suite (unit + end-to-end; tests needing ../shared/data skip where it is absent).
# Extra arguments go to pytest (e.g. -m "not slow", -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
python -m pytest "$@"
