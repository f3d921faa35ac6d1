#!/usr/bin/env bash
# The NTP-only baseline of stage 1: upstream's recipe through the plugin with --contrastive_weight 0
# (step-for-step upstream's training, plus seeding before the model build and resumable checkpoints).
# Same environment variables as pretrain_contrastive.sh. UPSTREAM_ENTRY=1 runs upstream's own
# `llava.train.train` instead (no resumable checkpoints: upstream issues #1164/#1496).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [[ -z "${MODEL:-}" ]]; then
  export OUTPUT_DIR="${OUTPUT_DIR:-$(cd "$here/.." && pwd)/checkpoints/tiny-pretrain-ntp}"
fi
if [[ "${UPSTREAM_ENTRY:-0}" == 1 ]]; then
  export TRAIN_MODULE=llava.train.train
  exec bash "$here/pretrain_contrastive.sh" "$@"
fi
CONTRASTIVE_WEIGHT=0 exec bash "$here/pretrain_contrastive.sh" "$@"
