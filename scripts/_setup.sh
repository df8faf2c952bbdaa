#!/usr/bin/env bash
# Shared by demo.sh and test.sh (sourced): create the virtual environment and install the project into it, once.
# Torch first, from the wheels pip can reach (CPU machines here serve torch 2.14.1 from local disk), then the project.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
VENV="${RESAD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.anomalib-resad-installed"
want="$(sha256sum pyproject.toml anomalib_resad_hook.py anomalib_resad_hook.pth | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  case "$(uname -m)" in
    aarch64|arm64) torch_spec=(torch==2.9.1 torchvision==0.24.1) ;;
    *) torch_spec=(torch==2.14.1 torchvision==0.29.1) ;;
  esac
  python -m pip install --quiet --disable-pip-version-check "${torch_spec[@]}"
  python -m pip install --quiet --disable-pip-version-check -e ".[offline,test]"
  echo "$want" > "$stamp"
fi
# Never reach for a model hub: fail at once instead of retrying.
export HF_HUB_OFFLINE=1
