#!/usr/bin/env bash
# Fresh machine -> trained ResAD finding anomalies in classes it never saw, offline, in a few minutes on a CPU.
# Extra arguments go to `resad demo` (e.g. --epochs 8 --k 2 --output_dir results/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
resad demo "$@"
