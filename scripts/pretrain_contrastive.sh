#!/usr/bin/env bash
# Stage 1: projector alignment with NTP + contrastive loss. Mirrors upstream scripts/v1_5/pretrain.sh
# (global batch 256, lr 1e-3, cosine, warmup 0.03, ZeRO-2, bf16, gradient checkpointing).
#
# With no settings it runs the embedded tiny default on this machine (CPU, no network).
# Point it at real models and data with environment variables:
#   MODEL=lmsys/vicuna-13b-v1.5  VISION_TOWER=openai/clip-vit-large-patch14-336
#   DATA_PATH=./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json
#   IMAGE_FOLDER=./playground/data/LLaVA-Pretrain/images  OUTPUT_DIR=./checkpoints/llava-v1.5-13b-pretrain-contrastive
#   NUM_GPUS=8  NNODES=1  GLOBAL_BATCH=256  PER_DEVICE_BATCH=32  REPORT_TO=wandb  SAVE_STEPS=200
#   DEEPSPEED_CONFIG=scripts/zero2.json  PROJECTOR=mlp2x_gelu  CONTRASTIVE_WEIGHT=...  PYTHON=python
#   MAX_STEPS=N (stop after N optimizer steps; default one epoch)
#   ELASTIC_DATA_ORDER=True (default; False: transformers' sampler, upstream's order; see README "Reliability")
# Several nodes: HOSTFILE (DeepSpeed), SLURM (sbatch), or NNODES + NODE_RANK + MASTER_ADDR (torchrun on
# each node); LAUNCHER picks one explicitly and DRY_RUN=1 prints the plan and command (scripts/lib.sh).
# PER_DEVICE_BATCH defaults to 32, or GLOBAL_BATCH / ranks when that is smaller.
# Extra arguments are passed to the trainer (e.g. --contrastive_loss siglip).
# Re-running the same command after an interruption resumes from the last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -z "${MODEL:-}" ]]; then
  tiny_assets
  MODEL="$TINY_LLM"; VISION_TOWER="$TINY_VISION"; DATA_PATH="$TINY_DATA"; IMAGE_FOLDER="$TINY_IMAGES"
  OUTPUT_DIR="${OUTPUT_DIR:-$repo/checkpoints/tiny-pretrain-contrastive}"
  NUM_GPUS="${NUM_GPUS:-1}"; GLOBAL_BATCH="${GLOBAL_BATCH:-32}"; PER_DEVICE_DEFAULT=$GLOBAL_BATCH
  REPORT_TO="${REPORT_TO:-none}"; SAVE_STEPS="${SAVE_STEPS:-100}"; MAX_LENGTH="${MAX_LENGTH:-128}"
  PRECISION=(); GRAD_CKPT=False; LR="${LR:-1e-3}"
  [[ "$NUM_GPUS" -gt 1 ]] && DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero2.json}"
  TINY=1
else
  : "${VISION_TOWER:?set VISION_TOWER (e.g. openai/clip-vit-large-patch14-336)}"
  : "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
  NUM_GPUS="${NUM_GPUS:-$(default_num_gpus)}"; GLOBAL_BATCH="${GLOBAL_BATCH:-256}"; PER_DEVICE_DEFAULT=32
  REPORT_TO="${REPORT_TO:-wandb}"; SAVE_STEPS="${SAVE_STEPS:-200}"; MAX_LENGTH="${MAX_LENGTH:-2048}"
  PRECISION=(--bf16 True --tf32 True); GRAD_CKPT=True; LR="${LR:-1e-3}"
  DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$repo/scripts/zero2.json}"
  TINY=0
fi
resolve_nodes
plan_batch pretrain_contrastive "$PER_DEVICE_DEFAULT" "$([[ "${CONTRASTIVE_WEIGHT:-1}" == 0 ]] && echo 0 || echo 1)"

ds=(); [[ -n "${DEEPSPEED_CONFIG:-}" ]] && ds=(--deepspeed "$DEEPSPEED_CONFIG")
# a data order from --seed alone, so a preempted run resumes on another number of GPUs with the same
# samples at every step (upstream's own entry has no such flag)
elastic=(); [[ "${TRAIN_MODULE:-llava_contrastive.train}" != llava.* ]] && elastic=(--elastic_data_order "${ELASTIC_DATA_ORDER:-True}")
steps=(); [[ -n "${MAX_STEPS:-}" ]] && steps=(--max_steps "$MAX_STEPS")   # default: EPOCHS (1) over the data
launch "${TRAIN_MODULE:-llava_contrastive.train}" \
  "${ds[@]}" \
  --model_name_or_path "$MODEL" --version plain \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
  --vision_tower "$VISION_TOWER" --mm_projector_type "${PROJECTOR:-mlp2x_gelu}" \
  --tune_mm_mlp_adapter True --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  "${PRECISION[@]}" "${steps[@]}" "${elastic[@]}" \
  --output_dir "$OUTPUT_DIR" \
  --num_train_epochs "${EPOCHS:-1}" --per_device_train_batch_size "$PER_DEVICE_BATCH" \
  --per_device_eval_batch_size 4 --gradient_accumulation_steps "$ACCUM" \
  --evaluation_strategy no --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit "${SAVE_TOTAL_LIMIT:-2}" \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps "${LOGGING_STEPS:-1}" --model_max_length "$MAX_LENGTH" \
  --gradient_checkpointing "$GRAD_CKPT" --dataloader_num_workers "${WORKERS:-$([[ $TINY == 1 ]] && echo 0 || echo 4)}" \
  --lazy_preprocess True --report_to "$REPORT_TO" --seed "${SEED:-42}" \
  ${CONTRASTIVE_WEIGHT:+--contrastive_weight "$CONTRASTIVE_WEIGHT"} \
  "$@"
echo "pretrain_contrastive: projector at $OUTPUT_DIR/mm_projector.bin" >&2

# The embedded default ends by measuring alignment on the held-out split (report.json + figures).
# For real runs: python -m llava_contrastive.eval --help (and docs/EVALUATION.md).
if [[ "$TINY" == 1 && "${NO_EVAL:-0}" != 1 && "${TRAIN_MODULE:-llava_contrastive.train}" == llava_contrastive.train ]]; then
  "$PY" -m llava_contrastive.eval --model_name_or_path "$MODEL" --vision_tower "$VISION_TOWER" \
    --projector "$OUTPUT_DIR" --data_path "$TINY_HELDOUT" --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR/eval"
fi
