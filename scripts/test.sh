#!/usr/bin/env bash
# The test command: sets up the pinned environment if needed, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not distributed" -x`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")"
cache="${LLAVA_CONTRASTIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-contrastive}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LLAVA_CONTRASTIVE_QUIET=1
cd "$repo"
exec "$py" -m pytest -ra --durations=15 "$@"
