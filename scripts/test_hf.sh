#!/usr/bin/env bash
# Runs the transformers-native host tests (tests/hf) in the stack-M venv, offline.
#   scripts/test_hf.sh [extra pytest args]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/setup_env_hf.sh")"
cd "$repo"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LLAVA_CONTRASTIVE_QUIET=1
exec "$py" -m pytest tests/hf -q -p no:cacheprovider "$@"
