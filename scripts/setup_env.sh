#!/usr/bin/env bash
# Creates (once) and refreshes the project's pinned CPU environment, then prints its python.
# Quick when already up to date: a stamp holds the hash of the requirement files.
#   PYTHON=/path/to/python     use that interpreter as is (your own GPU environment); nothing is installed
#   LLAVA_CONTRASTIVE_VENV=DIR  where the venv lives (default: <repo>/.venv)
#   LLAVA_HOST=skip             do not install llava-torch (you provide llava, e.g. pip install -e /path/to/LLaVA --no-deps)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_env: PYTHON=$PYTHON not found" >&2; exit 2; }
  echo "$PYTHON"; exit 0
fi
venv="${LLAVA_CONTRASTIVE_VENV:-$repo/.venv}"
py="$venv/bin/python"
base_python="${BASE_PYTHON:-python3}"
stamp="$venv/.llava-contrastive-stamp"
want="$(cat "$repo/requirements/cpu-llava.txt" "$repo/requirements/host-llava.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)-${LLAVA_HOST:-pypi}"
if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$py"; exit 0
fi
{
  echo "setup_env: installing the pinned CPU environment into $venv (about 1 minute, 1.4 GB)"
  [[ -x "$py" ]] || "$base_python" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$py" -m pip install -q -r "$repo/requirements/cpu-llava.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import torch, transformers, deepspeed" 2>/dev/null || "$py" -m pip install -r "$repo/requirements/cpu-llava.txt"
  if [[ "${LLAVA_HOST:-pypi}" != "skip" ]]; then
    "$py" -m pip install -q --no-deps -r "$repo/requirements/host-llava.txt" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "$py" -m pip install -q --no-deps --no-build-isolation -e "$repo" 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import llava_contrastive" >/dev/null
  echo "$want" > "$stamp"
} >&2
echo "$py"
