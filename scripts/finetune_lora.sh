#!/usr/bin/env bash
# Stage 2: LoRA instruction tuning on top of a (contrastive) stage-1 projector. Mirrors upstream
# scripts/v1_5/finetune_lora.sh (ZeRO-3, --version v1, lora r 128 / alpha 256, lr 2e-4,
# --mm_projector_lr 2e-5, image_aspect_ratio pad, group_by_modality_length, global batch 128).
# Runs through the plugin's entry with --contrastive_weight 0, which fixes upstream's stage-2 CPU /
# ZeRO defects (empty --mm_projector_lr group, CUDA sync on save); the training is upstream's.
#
# With no settings: the embedded tiny default, on the projector of `bash scripts/pretrain_contrastive.sh`
# (which it runs first when missing). Real runs:
#   MODEL=lmsys/vicuna-13b-v1.5  VISION_TOWER=openai/clip-vit-large-patch14-336
#   PROJECTOR_FILE=./checkpoints/llava-v1.5-13b-pretrain-contrastive/mm_projector.bin
#   DATA_PATH=./playground/data/llava_v1_5_mix665k.json  IMAGE_FOLDER=./playground/data
#   OUTPUT_DIR=./checkpoints/llava-v1.5-13b-lora-contrastive  NUM_GPUS=8 GLOBAL_BATCH=128 PER_DEVICE_BATCH=16
# FULL_FINETUNE=1 gives upstream's finetune.sh instead (no LoRA, lr 2e-5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -z "${MODEL:-}" ]]; then
  tiny_assets
  MODEL="$TINY_LLM"; VISION_TOWER="$TINY_VISION"; DATA_PATH="$TINY_INSTRUCT"; IMAGE_FOLDER="$TINY_INSTRUCT_IMAGES"
  PROJECTOR_FILE="${PROJECTOR_FILE:-$repo/checkpoints/tiny-pretrain-contrastive/mm_projector.bin}"
  if [[ ! -f "$PROJECTOR_FILE" ]]; then
    echo "finetune: no stage-1 projector at $PROJECTOR_FILE; running scripts/pretrain_contrastive.sh first" >&2
    NO_EVAL=1 bash "$repo/scripts/pretrain_contrastive.sh"
  fi
  OUTPUT_DIR="${OUTPUT_DIR:-$repo/checkpoints/tiny-finetune-$([[ "${FULL_FINETUNE:-0}" == 1 ]] && echo full || echo lora)}"
  NUM_GPUS="${NUM_GPUS:-1}"; GLOBAL_BATCH="${GLOBAL_BATCH:-8}"; PER_DEVICE_DEFAULT=$GLOBAL_BATCH
  REPORT_TO="${REPORT_TO:-none}"; MAX_LENGTH="${MAX_LENGTH:-256}"; PRECISION=(); GRAD_CKPT=False
  MAX_STEPS=(--max_steps "${MAX_STEPS:-20}"); LORA_R="${LORA_R:-8}"; LORA_ALPHA="${LORA_ALPHA:-16}"
  [[ "$NUM_GPUS" -gt 1 ]] && DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero3.json}"
  WORKERS="${WORKERS:-0}"
else
  : "${VISION_TOWER:?set VISION_TOWER}" "${PROJECTOR_FILE:?set PROJECTOR_FILE (stage-1 mm_projector.bin)}"
  : "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
  NUM_GPUS="${NUM_GPUS:-$(default_num_gpus)}"; GLOBAL_BATCH="${GLOBAL_BATCH:-128}"; PER_DEVICE_DEFAULT=16
  REPORT_TO="${REPORT_TO:-wandb}"; MAX_LENGTH="${MAX_LENGTH:-2048}"; PRECISION=(--bf16 True --tf32 True); GRAD_CKPT=True
  MAX_STEPS=(); LORA_R="${LORA_R:-128}"; LORA_ALPHA="${LORA_ALPHA:-256}"
  DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero3.json}"; WORKERS="${WORKERS:-4}"
fi
resolve_nodes
plan_batch finetune "$PER_DEVICE_DEFAULT" 0
if [[ "${FULL_FINETUNE:-0}" == 1 ]]; then
  MODE=(); LR="${LR:-2e-5}"
else
  MODE=(--lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --mm_projector_lr 2e-5); LR="${LR:-2e-4}"
fi
ds=(); [[ -n "${DEEPSPEED_CONFIG:-}" ]] && ds=(--deepspeed "$DEEPSPEED_CONFIG")
launch llava_contrastive.train \
  "${ds[@]}" "${MODE[@]}" \
  --model_name_or_path "$MODEL" --version v1 \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
  --vision_tower "$VISION_TOWER" --pretrain_mm_mlp_adapter "$PROJECTOR_FILE" \
  --mm_projector_type "${PROJECTOR:-mlp2x_gelu}" --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio pad --group_by_modality_length True \
  "${PRECISION[@]}" "${MAX_STEPS[@]}" \
  --output_dir "$OUTPUT_DIR" --num_train_epochs 1 \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps "$ACCUM" --evaluation_strategy no \
  --save_strategy steps --save_steps "${SAVE_STEPS:-50000}" --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --model_max_length "$MAX_LENGTH" --gradient_checkpointing "$GRAD_CKPT" \
  --dataloader_num_workers "$WORKERS" --lazy_preprocess True --report_to "$REPORT_TO" \
  --seed "${SEED:-42}" --contrastive_weight 0 \
  "$@"
echo "finetune: stage-2 output in $OUTPUT_DIR" >&2
