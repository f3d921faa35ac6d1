#!/usr/bin/env bash
# Downstream evaluation of a stage-2 (instruction-tuned) checkpoint: prints, and with --run executes,
# the lmms-eval command and upstream LLaVA's v1.5 benchmark commands (GQA, POPE, MME, TextVQA,
# ScienceQA-IMG, MMBench-dev, SEED-Bench). Printing needs no network, GPU or data.
#
#   bash scripts/eval_downstream.sh CKPT_DIR [--model-base BASE_LLM] [--name NAME] [--llava-repo DIR]
#                                   [--gpus N] [--conv-mode vicuna_v1] [--only lmms|upstream] [--run]
#
#   CKPT_DIR      stage-2 output: merged/full model, or a LoRA dir (adapter_config.json + non_lora_trainables.bin)
#   --model-base  base LLM of a LoRA checkpoint (e.g. lmsys/vicuna-13b-v1.5); needed for unmerged LoRA
#   --llava-repo  clone of haotian-liu/LLaVA with playground/data/eval prepared (upstream docs/Evaluation.md);
#                 default $LLAVA_REPO or ./LLaVA. Upstream commands are run from there.
#   --run         execute instead of printing (needs GPUs, the benchmark data and, for lmms-eval, its datasets)
# See docs/EVALUATION.md for the whole path (held-out alignment -> stage 2 -> benchmarks).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ "$1" == "-h" || "$1" == "--help" ]] && { usage; exit 0; }
CKPT="$1"; shift
BASE=""; NAME=""; REPO_DIR="${LLAVA_REPO:-./LLaVA}"; GPUS="${NUM_GPUS:-1}"; CONV="vicuna_v1"; ONLY=""; RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-base) BASE="$2"; shift 2;;
    --name) NAME="$2"; shift 2;;
    --llava-repo) REPO_DIR="$2"; shift 2;;
    --gpus) GPUS="$2"; shift 2;;
    --conv-mode) CONV="$2"; shift 2;;
    --only) ONLY="$2"; shift 2;;
    --run) RUN=1; shift;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2;;
  esac
done

CKPT="$(cd "$CKPT" 2>/dev/null && pwd || echo "$CKPT")"
NAME="${NAME:-$(basename "$CKPT")}"
LORA=0
if [[ -f "$CKPT/adapter_config.json" || -f "$CKPT/non_lora_trainables.bin" ]]; then LORA=1; fi

# Upstream's loader (llava.model.builder.load_pretrained_model) picks the architecture from the
# directory name: it must contain "llava", and "lora" for an unmerged LoRA checkpoint.
base_name="$(basename "$CKPT")"
if [[ "${base_name,,}" != *llava* ]]; then
  echo "# WARNING: '$base_name' does not contain 'llava': upstream's loader would load it as a plain LM." >&2
  echo "#          Rename or symlink it (e.g. ln -s $CKPT $(dirname "$CKPT")/llava-$base_name)." >&2
fi
MB=()
if [[ "$LORA" == 1 ]]; then
  [[ "${base_name,,}" == *lora* ]] || echo "# WARNING: LoRA checkpoint name should contain 'lora' for upstream's loader." >&2
  if [[ -z "$BASE" ]]; then
    echo "# LoRA checkpoint: pass --model-base BASE_LLM (the stage-2 --model_name_or_path), or merge first." >&2
    BASE="BASE_LLM"
  fi
  MB=(--model-base "$BASE")
  MERGED="$(dirname "$CKPT")/${base_name}-merged"
  [[ "${MERGED,,}" == *llava* ]] || MERGED="$(dirname "$CKPT")/llava-${base_name}-merged"
  MERGED="${MERGED//-lora/}"
fi

cmds=()
add() { cmds+=("$*"); }

if [[ "$ONLY" != "upstream" ]]; then
  add "# ---- lmms-eval (pip install lmms-eval; datasets come from the HF hub) ----"
  if [[ "$LORA" == 1 ]]; then
    add "# lmms-eval loads a merged model: merge the LoRA weights first (upstream script)"
    add "(cd $REPO_DIR && python scripts/merge_lora_weights.py --model-path $CKPT --model-base $BASE --save-model-path $MERGED)"
    LM_MODEL="$MERGED"
  else
    LM_MODEL="$CKPT"
  fi
  add "python -m accelerate.commands.launch --num_processes=$GPUS -m lmms_eval --model llava" \
      "--model_args pretrained=$LM_MODEL,conv_template=$CONV" \
      "--tasks gqa,pope,mme,textvqa_val,scienceqa_img,mmbench_en_dev,seedbench" \
      "--batch_size 1 --log_samples --log_samples_suffix $NAME --output_path ./logs/lmms-eval/$NAME"
fi

if [[ "$ONLY" != "lmms" ]]; then
  E=./playground/data/eval
  COMMON="--model-path $CKPT ${MB[*]} --temperature 0 --conv-mode $CONV"
  add "# ---- upstream LLaVA v1.5 benchmarks (run inside $REPO_DIR; data layout of its docs/Evaluation.md) ----"
  add "# checked against haotian-liu/LLaVA at c121f04 (scripts/v1_5/eval/{gqa,pope,mme,textvqa,sqa,mmbench,seed}.sh)"
  add "# upstream's scripts/v1_5/eval/<bench>.sh do the same with --num-chunks/--chunk-idx over GPUs; the single-process"
  add "# form is printed here. To reuse them: sed 's#liuhaotian/llava-v1.5-13b#$CKPT#; s#llava-v1.5-13b#$NAME#g' scripts/v1_5/eval/gqa.sh | bash"
  add "cd $REPO_DIR"
  add "# GQA (testdev-balanced)"
  add "python -m llava.eval.model_vqa_loader $COMMON --question-file $E/gqa/llava_gqa_testdev_balanced.jsonl --image-folder $E/gqa/data/images --answers-file $E/gqa/answers/llava_gqa_testdev_balanced/$NAME/merge.jsonl"
  add "python scripts/convert_gqa_for_eval.py --src $E/gqa/answers/llava_gqa_testdev_balanced/$NAME/merge.jsonl --dst $E/gqa/data/testdev_balanced_predictions.json"
  add "(cd $E/gqa/data && python eval/eval.py --tier testdev_balanced)"
  add "# POPE (adversarial / popular / random, COCO val2014)"
  add "python -m llava.eval.model_vqa_loader $COMMON --question-file $E/pope/llava_pope_test.jsonl --image-folder $E/pope/val2014 --answers-file $E/pope/answers/$NAME.jsonl"
  add "python llava/eval/eval_pope.py --annotation-dir $E/pope/coco --question-file $E/pope/llava_pope_test.jsonl --result-file $E/pope/answers/$NAME.jsonl"
  add "# MME (perception + cognition)"
  add "python -m llava.eval.model_vqa_loader $COMMON --question-file $E/MME/llava_mme.jsonl --image-folder $E/MME/MME_Benchmark_release_version --answers-file $E/MME/answers/$NAME.jsonl"
  add "(cd $E/MME && python convert_answer_to_mme.py --experiment $NAME && cd eval_tool && python calculation.py --results_dir answers/$NAME)"
  add "# TextVQA (val, with OCR tokens in the prompt)"
  add "python -m llava.eval.model_vqa_loader $COMMON --question-file $E/textvqa/llava_textvqa_val_v051_ocr.jsonl --image-folder $E/textvqa/train_images --answers-file $E/textvqa/answers/$NAME.jsonl"
  add "python -m llava.eval.eval_textvqa --annotation-file $E/textvqa/TextVQA_0.5.1_val.json --result-file $E/textvqa/answers/$NAME.jsonl"
  add "# ScienceQA-IMG (test split; the IMG score is the image subset reported by eval_science_qa.py)"
  add "python -m llava.eval.model_vqa_science $COMMON --question-file $E/scienceqa/llava_test_CQM-A.json --image-folder $E/scienceqa/images/test --answers-file $E/scienceqa/answers/$NAME.jsonl --single-pred-prompt"
  add "python llava/eval/eval_science_qa.py --base-dir $E/scienceqa --result-file $E/scienceqa/answers/$NAME.jsonl --output-file $E/scienceqa/answers/${NAME}_output.jsonl --output-result $E/scienceqa/answers/${NAME}_result.json"
  add "# MMBench-dev (en); the converted file is scored by the MMBench evaluation server (upload needs network)"
  add "python -m llava.eval.model_vqa_mmbench $COMMON --question-file $E/mmbench/mmbench_dev_20230712.tsv --answers-file $E/mmbench/answers/mmbench_dev_20230712/$NAME.jsonl --single-pred-prompt --lang en"
  add "mkdir -p $E/mmbench/answers_upload/mmbench_dev_20230712"
  add "python scripts/convert_mmbench_for_submission.py --annotation-file $E/mmbench/mmbench_dev_20230712.tsv --result-dir $E/mmbench/answers/mmbench_dev_20230712 --upload-dir $E/mmbench/answers_upload/mmbench_dev_20230712 --experiment $NAME"
  add "# SEED-Bench (image part; upstream evaluates on extracted video frames too)"
  add "python -m llava.eval.model_vqa_loader $COMMON --question-file $E/seed_bench/llava-seed-bench.jsonl --image-folder $E/seed_bench --answers-file $E/seed_bench/answers/$NAME/merge.jsonl"
  add "mkdir -p $E/seed_bench/answers_upload"
  add "python scripts/convert_seed_for_submission.py --annotation-file $E/seed_bench/SEED-Bench.json --result-file $E/seed_bench/answers/$NAME/merge.jsonl --result-upload-file $E/seed_bench/answers_upload/$NAME.jsonl"
fi

echo "# downstream evaluation of $CKPT (name $NAME$([[ $LORA == 1 ]] && echo ", LoRA on $BASE"))"
if [[ "$RUN" == 0 ]]; then
  printf '%s\n' "${cmds[@]}"
  echo "# (printed only; add --run to execute)"
  exit 0
fi
for c in "${cmds[@]}"; do
  [[ "$c" == \#* ]] && { echo "$c"; continue; }
  echo "+ $c" >&2
  if [[ "$c" == "cd "* ]]; then eval "$c"; else bash -c "$c"; fi
done
