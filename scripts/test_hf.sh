#!/usr/bin/env bash
# Runs the transformers-native host tests in the stack-M venv, offline.
#   scripts/test_hf.sh [pytest args]      (default target tests/hf; give tests/hf/test_x.py to run one file)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/setup_env_hf.sh")"
cd "$repo"
target=(tests/hf)
for a in "$@"; do [[ "$a" == tests/* ]] && target=(); done
exec "$py" -m pytest "${target[@]}" -q -p no:cacheprovider "$@"
