#!/usr/bin/env bash
# Stage 1 on the transformers-native host (stack M): projector alignment with NTP + contrastive loss,
# `python -m llava_contrastive.hosts.hf.train`. Mirrors upstream scripts/v1_5/pretrain.sh (global
# batch 256, lr 1e-3, cosine, warmup 0.03 (--warmup_steps 0.03: a ratio in transformers 5), ZeRO-2,
# bf16 + tf32, gradient checkpointing, max length 2048), like scripts/pretrain_contrastive.sh does
# for the upstream host.
#
# With no settings: the embedded tiny default (CPU, no network), ending with the held-out report.
# Real runs:
#   MODEL=lmsys/vicuna-13b-v1.5  VISION_TOWER=openai/clip-vit-large-patch14-336   # assembled at start-up
#   (or MODEL=<native LLaVA checkpoint> and no VISION_TOWER; needed for ZeRO-3)
#   DATA_PATH=./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json
#   IMAGE_FOLDER=./playground/data/LLaVA-Pretrain/images  OUTPUT_DIR=./checkpoints/llava-v1.5-13b-pretrain-contrastive-hf
#   NUM_GPUS=8 NNODES=1 GLOBAL_BATCH=256 PER_DEVICE_BATCH=32 REPORT_TO=wandb SAVE_STEPS=200
#   DEEPSPEED_CONFIG=scripts/zero2.json  CONTRASTIVE_WEIGHT=...  PYTHON=<your stack-M python>
#   PROJECTOR_TYPE=mlp2x_gelu (default) | linear  (with VISION_TOWER: the projector built at start-up)
# Extra arguments go to the entry (any --contrastive_* flag or TrainingArguments flag).
# Re-running the same command after an interruption resumes from the last complete checkpoint.
# Output: mm_projector.bin (upstream keys; --pretrain_mm_mlp_adapter of either host's stage 2), the
# contrastive head files, and (not under ZeRO-3) a native checkpoint + processor for
# scripts/hf/finetune_lora.sh (MODEL=OUTPUT_DIR).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$(bash "$repo/scripts/setup_env_hf.sh")}"
export PYTHON   # lib.sh then uses this interpreter (stack M)
source "$repo/scripts/lib.sh"

if [[ -z "${MODEL:-}" ]]; then
  tiny_assets
  MODEL="$TINY_LLM"; VISION_TOWER="$TINY_VISION"; DATA_PATH="$TINY_DATA"; IMAGE_FOLDER="$TINY_IMAGES"
  OUTPUT_DIR="${OUTPUT_DIR:-$repo/checkpoints/tiny-pretrain-contrastive-hf}"
  NUM_GPUS="${NUM_GPUS:-1}"; GLOBAL_BATCH="${GLOBAL_BATCH:-32}"; PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-$(( GLOBAL_BATCH / NUM_GPUS ))}"
  REPORT_TO="${REPORT_TO:-none}"; SAVE_STEPS="${SAVE_STEPS:-100}"; MAX_LENGTH="${MAX_LENGTH:-128}"
  PRECISION=(); GRAD_CKPT=False; WORKERS="${WORKERS:-0}"
  [[ "$NUM_GPUS" -gt 1 ]] && DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero2.json}"
  TINY=1
else
  : "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
  NUM_GPUS="${NUM_GPUS:-$(default_num_gpus)}"; GLOBAL_BATCH="${GLOBAL_BATCH:-256}"; PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-32}"
  REPORT_TO="${REPORT_TO:-wandb}"; SAVE_STEPS="${SAVE_STEPS:-200}"; MAX_LENGTH="${MAX_LENGTH:-2048}"
  PRECISION=(--bf16 True --tf32 True); GRAD_CKPT=True; WORKERS="${WORKERS:-4}"
  DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero2.json}"
  TINY=0
fi
if [[ -n "${VISION_TOWER:-}" ]]; then
  BASE=(--llm_dir "$MODEL" --vision_dir "$VISION_TOWER" --mm_projector_type "${PROJECTOR_TYPE:-mlp2x_gelu}")
else
  BASE=(--model_name_or_path "$MODEL")
fi
resolve_nodes
ranks=$(( NUM_GPUS * NNODES ))
ACCUM=$(( GLOBAL_BATCH / (ranks * PER_DEVICE_BATCH) ))
if [[ "$ACCUM" -lt 1 || $(( ACCUM * ranks * PER_DEVICE_BATCH )) -ne "$GLOBAL_BATCH" ]]; then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of ranks ($ranks) x PER_DEVICE_BATCH ($PER_DEVICE_BATCH)" >&2; exit 2
fi
echo "pretrain_contrastive (hf): $ranks rank(s) x batch $PER_DEVICE_BATCH x accumulation $ACCUM = global $GLOBAL_BATCH" >&2

ds=(); [[ -n "${DEEPSPEED_CONFIG:-}" ]] && ds=(--deepspeed "$DEEPSPEED_CONFIG")
launch llava_contrastive.hosts.hf.train \
  "${ds[@]}" "${BASE[@]}" --vision_feature_layer -2 \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
  "${PRECISION[@]}" \
  --output_dir "$OUTPUT_DIR" \
  --num_train_epochs "${EPOCHS:-1}" --per_device_train_batch_size "$PER_DEVICE_BATCH" \
  --gradient_accumulation_steps "$ACCUM" \
  --eval_strategy no --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit "${SAVE_TOTAL_LIMIT:-2}" \
  --learning_rate "${LR:-1e-3}" --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
  --logging_steps "${LOGGING_STEPS:-1}" --model_max_length "$MAX_LENGTH" \
  --gradient_checkpointing "$GRAD_CKPT" --dataloader_num_workers "$WORKERS" \
  --report_to "$REPORT_TO" --seed "${SEED:-42}" \
  ${CONTRASTIVE_WEIGHT:+--contrastive_weight "$CONTRASTIVE_WEIGHT"} \
  "$@"
echo "pretrain_contrastive (hf): projector at $OUTPUT_DIR/mm_projector.bin" >&2

if [[ "$TINY" == 1 && "${NO_EVAL:-0}" != 1 ]]; then
  "$PY" -m llava_contrastive.hosts.hf.eval --model_name_or_path "$OUTPUT_DIR" \
    --data_path "$TINY_HELDOUT" --image_folder "$IMAGE_FOLDER" --output_dir "$OUTPUT_DIR/eval"
fi
