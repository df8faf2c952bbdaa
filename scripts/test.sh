#!/usr/bin/env bash
# Fresh machine -> the whole test suite (unit + end-to-end; tests needing ../shared/data skip where it is absent).
# Extra arguments go to pytest (e.g. -m "not slow", -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
# The suite trains many models in one process: keep glibc malloc from ballooning (costs about 2x CPU time in
# training through page faults, measured on the demo; the short demo does not set it).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"
# Two workers (pytest-xdist), each test module whole on one of them so its module-scoped trained models are built once.
# --no-loadscope-reorder: hand out the modules in collection order (tests/conftest.py puts the longest first); xdist's
# default order, most tests first, started the one-test ten-minute notebook last. Durations: to balance the modules.
python -m pytest -n "${RESAD_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=30 "$@"
