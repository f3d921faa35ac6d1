#!/usr/bin/env bash
# Stage 2, full fine-tuning (upstream scripts/v1_5/finetune.sh): finetune_lora.sh without LoRA.
FULL_FINETUNE=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_lora.sh" "$@"
