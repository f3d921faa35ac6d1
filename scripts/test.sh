#!/usr/bin/env bash
# The test command: sets up the pinned environments if needed, then runs pytest in each.
#   1. stack U (upstream LLaVA host, transformers 4.37): tests/ (extra arguments go to this pytest,
#      e.g. `bash scripts/test.sh -m "not slow" -x`)
#   2. stack M (transformers-native host, transformers 5.x): tests/hf via scripts/test_hf.sh
#      (LLAVA_CONTRASTIVE_SKIP_HF=1 skips it)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")" || exit 1
cache="${LLAVA_CONTRASTIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-contrastive}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$repo"
"$py" -m pytest -ra --durations=15 "$@"
status=$?
if [[ "${LLAVA_CONTRASTIVE_SKIP_HF:-0}" != 1 ]]; then
  echo "=== stack M: transformers-native host (tests/hf) ==="
  LLAVA_CONTRASTIVE_STACK_U_PYTHON="$py" LLAVA_CONTRASTIVE_REQUIRE_STACK_U=1 \
    bash "$repo/scripts/test_hf.sh" -ra || status=1
fi
exit $status
