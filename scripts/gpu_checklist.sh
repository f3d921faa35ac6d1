#!/usr/bin/env bash
# GPU checklist: the paths this project could not run on its CPU-only development machine
# (bf16, flash-attention 2, 1 and 8 GPUs, ZeRO-2/3). Checks the environment, then prints and runs
# each step in order, stopping at the first failure. See BENCHMARKS.md "GPU checklist" for what
# each step should show.
#
#   bash scripts/gpu_checklist.sh                 # all steps that the environment allows
#   DRY_RUN=1 bash scripts/gpu_checklist.sh       # print the commands only
#   FROM=5 bash scripts/gpu_checklist.sh          # start at step 5
# Real-model steps (7-9) run only when MODEL, VISION_TOWER, DATA_PATH and IMAGE_FOLDER are set
# (e.g. MODEL=lmsys/vicuna-7b-v1.5 VISION_TOWER=openai/clip-vit-large-patch14-336).
# PYTHON selects the interpreter (your CUDA environment); default: the project's pinned venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
OUT="${OUT:-$repo/checkpoints/gpu-checklist}"
FROM="${FROM:-1}"
STEPS="${REAL_STEPS:-30}"
n=0

step() {  # step "description" command...
  n=$((n + 1))
  if [[ "$n" -lt "$FROM" ]]; then return 0; fi
  echo; echo "== [$n] $1"; shift
  printf '   $'; printf ' %q' "$@"; echo
  [[ "${DRY_RUN:-0}" == 1 ]] && return 0
  if ! "$@"; then
    echo "!! step $n failed; fix it and re-run with FROM=$n" >&2
    exit 1
  fi
}

check_env() {
  command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: no NVIDIA driver" >&2; return 1; }
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  "$PY" - <<'PY'
import importlib.util, sys
import torch
ok = True
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: install a CUDA build of torch 2.1+ matching the driver")
n = torch.cuda.device_count()
print("devices", n, [torch.cuda.get_device_name(i) for i in range(n)])
print("bf16 supported", torch.cuda.is_bf16_supported())
if not torch.cuda.is_bf16_supported():
    print("!! no bf16 (pre-Ampere GPU): the recipe's --bf16 True will fail; use --fp16 True and expect "
          "different numerics than upstream's published runs"); ok = False
for mod in ("flash_attn", "deepspeed", "llava", "transformers"):
    spec = importlib.util.find_spec(mod)
    print(f"{mod:12s}", "ok" if spec else "MISSING")
    if spec is None and mod != "flash_attn":
        ok = False
if importlib.util.find_spec("flash_attn") is None:
    print("!! flash_attn missing: steps using llava_contrastive.train_mem will fail "
          "(pip install flash-attn --no-build-isolation)"); ok = False
else:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
sys.exit(0 if ok else 1)
PY
}

ngpu() { "$PY" -c "import torch; print(torch.cuda.device_count())"; }

step "environment: driver, CUDA torch, bf16, flash-attn, deepspeed" check_env
step "what to expect at the real recipe (counted FLOPs, 7B/13B; BENCHMARKS.md)" "$PY" -m llava_contrastive.dev.projection
step "unit + CPU tests (fast subset)" bash scripts/test.sh -x -q tests/core tests/test_bench.py
step "tiny stage 1 on 1 GPU (fp32, NTP + InfoNCE)" \
  env NUM_GPUS=1 OUTPUT_DIR="$OUT/tiny-1gpu" bash scripts/pretrain_contrastive.sh --max_steps 20
step "tiny stage 1 on all GPUs, ZeRO-2, gathered negatives" \
  env NUM_GPUS="$(ngpu)" DEEPSPEED_CONFIG="$repo/scripts/zero2.json" OUTPUT_DIR="$OUT/tiny-zero2" \
  bash scripts/pretrain_contrastive.sh --max_steps 20
step "tiny stage 1 on all GPUs, ZeRO-3" \
  env NUM_GPUS="$(ngpu)" DEEPSPEED_CONFIG="$repo/scripts/zero3.json" OUTPUT_DIR="$OUT/tiny-zero3" \
  bash scripts/pretrain_contrastive.sh --max_steps 20

if [[ -z "${MODEL:-}" || -z "${VISION_TOWER:-}" || -z "${DATA_PATH:-}" || -z "${IMAGE_FOLDER:-}" ]]; then
  echo; echo "== real-model steps skipped: set MODEL, VISION_TOWER, DATA_PATH, IMAGE_FOLDER"; exit 0
fi
real() {  # real NAME EXTRA...: $STEPS steps of the real recipe (bf16, flash-attn 2, ZeRO-2, grad. checkpointing)
  local name="$1"; shift
  env TRAIN_MODULE=llava_contrastive.train_mem OUTPUT_DIR="$OUT/$name" REPORT_TO=none SAVE_STEPS=100000 \
    bash scripts/pretrain_contrastive.sh --max_steps "$STEPS" "$@"
}
step "real recipe, NTP only (--contrastive_weight 0 = upstream), bf16 + flash-attn 2" real ntp --contrastive_weight 0
step "real recipe, default contrastive (InfoNCE, text input_embeds)" real infonce
step "real recipe, text from the prompted LLM pass (prompteol)" real text-llm --contrastive_text_source llm
echo; echo "all steps passed; compare train_runtime / train_samples_per_second and ntp_loss of the three real runs:"
echo "the projection (step 2) predicts infonce / ntp = 1.000 and text-llm / ntp = 1.02-1.03 in FLOPs (compute-bound time)"
echo "(logs: trainer output above; memory: nvidia-smi or torch.cuda.max_memory_allocated in your tracker)"
