#!/usr/bin/env bash
# Stage 2 on the transformers-native host (stack M): LoRA / QLoRA instruction tuning with
# `python -m llava_contrastive.hosts.hf.finetune`. Mirrors upstream scripts/v1_5/finetune_lora.sh
# (--version v1, LoRA r 128 / alpha 256, lr 2e-4, --mm_projector_lr 2e-5, image_aspect_ratio pad,
# bf16 + tf32, gradient checkpointing, global batch 128, 1 epoch, cosine, warmup 0.03 (--warmup_steps 0.03: a ratio in transformers 5), max length 2048).
# Not mirrored: group_by_modality_length (not implemented on this host) and ZeRO-3 by default
# (set DEEPSPEED_CONFIG to use one; never with BITS 4/8).
#
# With no settings: the embedded tiny default (CPU, 20 steps), on the native stage-1 projector of
# `python -m llava_contrastive.hosts.hf.train` or the upstream one of scripts/pretrain_contrastive.sh
# when either exists. Real runs:
#   MODEL=lmsys/vicuna-13b-v1.5  VISION_TOWER=openai/clip-vit-large-patch14-336    # built into OUTPUT_DIR/base_model
#   (or MODEL=<native checkpoint, e.g. the hosts.hf.train output> and no VISION_TOWER)
#   PROJECTOR_FILE=./checkpoints/llava-v1.5-13b-pretrain-contrastive/mm_projector.bin
#   DATA_PATH=./playground/data/llava_v1_5_mix665k.json  IMAGE_FOLDER=./playground/data
#   OUTPUT_DIR=./checkpoints/llava-v1.5-13b-lora-contrastive-hf  NUM_GPUS=8 GLOBAL_BATCH=128 PER_DEVICE_BATCH=16
# Other variables: BITS (16 | 8 | 4; QLoRA), LORA_R, LORA_ALPHA, LORA_DROPOUT, LR, MM_PROJECTOR_LR,
# CONV_VERSION (v1, upstream's Vicuna template, or chat_template: the LLM tokenizer's own, e.g. Qwen2's ChatML;
# answer with --conv-mode chat_template), MAX_LENGTH, EPOCHS, SAVE_STEPS, EVAL_SIZE + EVAL_STEPS (held-out
# records and evaluation interval),
# MERGE_DIR (merge LoRA into a float32 reload of the base and save a native checkpoint there),
# REPORT_TO, SEED, WORKERS, GRAD_CKPT, DEEPSPEED_CONFIG, PYTHON (your own stack-M interpreter).
# Extra arguments go to the entry (any TrainingArguments flag).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$(bash "$repo/scripts/setup_env_hf.sh")}"
export PYTHON   # lib.sh then uses this interpreter (stack M) instead of the stack-U venv
source "$repo/scripts/lib.sh"

if [[ -z "${MODEL:-}" ]]; then
  tiny_assets
  MODEL="$TINY_LLM"; VISION_TOWER="$TINY_VISION"; DATA_PATH="$TINY_INSTRUCT"; IMAGE_FOLDER="$TINY_INSTRUCT_IMAGES"
  if [[ -z "${PROJECTOR_FILE:-}" ]]; then
    for f in "$repo/checkpoints/tiny-pretrain-contrastive-hf/mm_projector.bin" \
             "$repo/checkpoints/tiny-pretrain-contrastive/mm_projector.bin"; do
      [[ -f "$f" ]] && { PROJECTOR_FILE="$f"; break; }
    done
  fi
  [[ -n "${PROJECTOR_FILE:-}" ]] || echo "finetune_lora (hf): no stage-1 projector found; the projector starts from its initialisation" >&2
  OUTPUT_DIR="${OUTPUT_DIR:-$repo/checkpoints/tiny-finetune-lora-hf}"
  NUM_GPUS="${NUM_GPUS:-1}"; GLOBAL_BATCH="${GLOBAL_BATCH:-8}"; PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-$(( GLOBAL_BATCH / NUM_GPUS ))}"
  REPORT_TO="${REPORT_TO:-none}"; MAX_LENGTH="${MAX_LENGTH:-256}"; PRECISION=(); GRAD_CKPT="${GRAD_CKPT:-False}"
  MAX_STEPS=(--max_steps "${MAX_STEPS:-20}"); LORA_R="${LORA_R:-8}"; LORA_ALPHA="${LORA_ALPHA:-16}"
  WORKERS="${WORKERS:-0}"; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  : "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
  NUM_GPUS="${NUM_GPUS:-$(default_num_gpus)}"; GLOBAL_BATCH="${GLOBAL_BATCH:-128}"; PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-16}"
  REPORT_TO="${REPORT_TO:-wandb}"; MAX_LENGTH="${MAX_LENGTH:-2048}"; PRECISION=(--bf16 True --tf32 True)
  GRAD_CKPT="${GRAD_CKPT:-True}"; MAX_STEPS=(); LORA_R="${LORA_R:-128}"; LORA_ALPHA="${LORA_ALPHA:-256}"
  WORKERS="${WORKERS:-4}"
fi
if [[ -n "${VISION_TOWER:-}" ]]; then
  BASE=(--llm_dir "$MODEL" --vision_dir "$VISION_TOWER")   # assembled once into OUTPUT_DIR/base_model
else
  BASE=(--model_name_or_path "$MODEL")                       # already a native LLaVA checkpoint
fi
PROJ=(); [[ -n "${PROJECTOR_FILE:-}" ]] && PROJ=(--pretrain_mm_mlp_adapter "$PROJECTOR_FILE")
resolve_nodes
ranks=$(( NUM_GPUS * NNODES ))
ACCUM=$(( GLOBAL_BATCH / (ranks * PER_DEVICE_BATCH) ))
[[ "$ACCUM" -ge 1 ]] || { echo "GLOBAL_BATCH too small for $ranks ranks x $PER_DEVICE_BATCH" >&2; exit 2; }
EVAL=(--eval_strategy no)
[[ -n "${EVAL_SIZE:-}" ]] && EVAL=(--eval_size "$EVAL_SIZE" --eval_strategy steps --eval_steps "${EVAL_STEPS:-500}")
MERGE=(); [[ -n "${MERGE_DIR:-}" ]] && MERGE=(--merge_and_export "$MERGE_DIR")
ds=(); [[ -n "${DEEPSPEED_CONFIG:-}" ]] && ds=(--deepspeed "$DEEPSPEED_CONFIG")
launch llava_contrastive.hosts.hf.finetune \
  "${ds[@]}" "${BASE[@]}" "${PROJ[@]}" --version "${CONV_VERSION:-v1}" \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --image_aspect_ratio pad \
  --bits "${BITS:-16}" --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "${LORA_DROPOUT:-0.05}" --mm_projector_lr "${MM_PROJECTOR_LR:-2e-5}" \
  "${PRECISION[@]}" "${MAX_STEPS[@]}" "${EVAL[@]}" "${MERGE[@]}" \
  --output_dir "$OUTPUT_DIR" --num_train_epochs "${EPOCHS:-1}" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps "${SAVE_STEPS:-50000}" --save_total_limit 1 \
  --learning_rate "${LR:-2e-4}" --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --model_max_length "$MAX_LENGTH" --gradient_checkpointing "$GRAD_CKPT" \
  --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO" --seed "${SEED:-42}" \
  "$@"
echo "finetune_lora (hf): adapter, mm_projector.bin and processor in $OUTPUT_DIR${MERGE_DIR:+; merged checkpoint in $MERGE_DIR}" >&2
