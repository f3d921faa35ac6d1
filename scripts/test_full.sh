#!/usr/bin/env bash
# The full test set: the README's test command (scripts/test.sh) plus the cases marked `long`, which
# CI leaves out to stay within its time budget (analysis-runner end-to-end runs). Arguments go to
# the stack-U pytest, as with scripts/test.sh.
set -uo pipefail
export LLAVA_CONTRASTIVE_FULL=1
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh" "$@"
