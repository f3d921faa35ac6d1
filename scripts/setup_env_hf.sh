#!/usr/bin/env bash
# Creates (once) and refreshes the stack-M CPU environment for the transformers-native host
# (llava_contrastive/hosts/hf), then prints its python. Quick when up to date (stamp = hash of
# requirements/cpu-hf.txt + pyproject.toml).
#   PYTHON=/path/to/python        use that interpreter as is; nothing is installed
#   LLAVA_CONTRASTIVE_HF_VENV=DIR where the venv lives (default: <repo>/.venv-hf)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_env_hf: PYTHON=$PYTHON not found" >&2; exit 2; }
  echo "$PYTHON"; exit 0
fi
venv="${LLAVA_CONTRASTIVE_HF_VENV:-$repo/.venv-hf}"
py="$venv/bin/python"
base_python="${BASE_PYTHON:-python3}"
stamp="$venv/.llava-contrastive-hf-stamp"
want="$(cat "$repo/requirements/cpu-hf.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$py"; exit 0
fi
{
  echo "setup_env_hf: installing the pinned stack-M CPU environment into $venv"
  [[ -x "$py" ]] || "$base_python" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # one pip command that includes torch, so pip never resolves a CUDA build
  "$py" -m pip install -q -r "$repo/requirements/cpu-hf.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import torch, transformers, accelerate, peft" 2>/dev/null || "$py" -m pip install -r "$repo/requirements/cpu-hf.txt"
  "$py" -m pip install -q --no-deps --no-build-isolation -e "$repo" 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import llava_contrastive, transformers; from transformers import LlavaForConditionalGeneration" >/dev/null
  echo "$want" > "$stamp"
} >&2
echo "$py"
