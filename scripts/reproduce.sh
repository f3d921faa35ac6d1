#!/usr/bin/env bash
# Two-stage reproduction: NTP-only vs joint stage 1 -> identical stage 2 -> every tiny benchmark ->
# report.md / report.json / report.png with paired 95% intervals (python -m llava_contrastive.reproduce).
#
# With no settings: the tiny tier, 5 seeds x 2 arms (ntp_only, joint), test split, 2 jobs on this machine.
# Environment (all optional):
#   TIER=tiny|small      asset tier (small: the larger Llama / CLIP, built by `python -m llava_contrastive.tiny --tier small`)
#   SEEDS="0 1 2 3 4"    seeds per arm
#   JOBS=2               (arm, seed) chains at once; OMP threads per job = cores / JOBS
#   OUTPUT_DIR=...       reproduction directory (default checkpoints/reproduce-<tier>-<split>)
#   SPLIT=test|validation   validation to choose settings, test to report them
#   STAGE2=full|lora     stage-2 fine-tune (default full)
# Extra arguments go to the runner, e.g.  --arm w1="--contrastive_weight 1"  --max_questions 50  --force
# Rerunning the same command continues an interrupted reproduction (finished cells are reused).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
TIER="${TIER:-tiny}"; SPLIT="${SPLIT:-test}"
OUTPUT_DIR="${OUTPUT_DIR:-$repo/checkpoints/reproduce-$TIER-$SPLIT}"
read -r -a seeds <<< "${SEEDS:-0 1 2 3 4}"
cd "$repo"
"$PY" -m llava_contrastive.reproduce --tier "$TIER" --split "$SPLIT" --seeds "${seeds[@]}" \
  --jobs "${JOBS:-2}" --stage2 "${STAGE2:-full}" --output_dir "$OUTPUT_DIR" "$@"
