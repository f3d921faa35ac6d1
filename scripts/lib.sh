# Shared by the scripts: environment, tiny defaults and the launcher. Source it; do not run it.
# Environment (all optional):
#   PYTHON        interpreter to use as is (your GPU environment); default: the project's pinned CPU venv
#   NUM_GPUS      processes per node (default: all visible GPUs, or 1 on CPU)
#   HOSTFILE      DeepSpeed hostfile for multi-node runs (launches with `deepspeed --hostfile`)
#   MASTER_PORT   rendezvous port (default 29500 + a hash of the output dir)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLAVA_CONTRASTIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-contrastive}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
PY="$(bash "$repo/scripts/setup_env.sh")"

has_gpu() { "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

default_num_gpus() {
  if has_gpu; then "$PY" -c "import torch; print(torch.cuda.device_count())"; else echo 1; fi
}

# tiny_assets: build (or reuse) the embedded tiny models and data; sets TINY_* variables.
tiny_assets() {
  local root="${TINY_ROOT:-$repo/playground/tiny}"
  HF_HUB_OFFLINE=1 "$PY" -m llava_contrastive.tiny --root "$root" >&2
  TINY_LLM="$root/models/vicuna-tiny"
  TINY_VISION="$root/models/clip-vit-tiny"
  TINY_DATA="$root/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
  TINY_HELDOUT="$root/data/LLaVA-Pretrain/heldout.json"
  TINY_IMAGES="$root/data/LLaVA-Pretrain/images"
  TINY_INSTRUCT="$root/data/llava_v1_5_mix665k.json"
  TINY_INSTRUCT_IMAGES="$root/data"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

# resolve_nodes: NNODES from HOSTFILE (one host per non-comment line) when unset; an NNODES that
# disagrees with HOSTFILE is refused, since the gradient accumulation (hence the global batch) is
# computed for NUM_GPUS x NNODES ranks.
resolve_nodes() {
  if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || { echo "HOSTFILE=$HOSTFILE: no such file (a DeepSpeed hostfile: 'host slots=N' per line)" >&2; exit 2; }
    local n
    n=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
    if [[ -z "${NNODES:-}" ]]; then
      NNODES=$n
    elif [[ "$NNODES" != "$n" ]]; then
      echo "NNODES=$NNODES but HOSTFILE=$HOSTFILE lists $n host(s): the global batch would be computed for the" \
           "wrong number of ranks. Set NNODES=$n, or leave NNODES unset to take it from the hostfile." >&2
      exit 2
    fi
  fi
  NNODES="${NNODES:-1}"
}

# launch MODULE ARGS...: one process, torchrun (CPU, several ranks) or deepspeed (GPU / multi-node).
launch() {
  local module="$1"; shift
  local n="${NUM_GPUS:-$(default_num_gpus)}"
  local port="${MASTER_PORT:-$(( 29500 + $(printf '%s' "${OUTPUT_DIR:-x}" | cksum | cut -d' ' -f1) % 2000 ))}"
  if [[ -n "${HOSTFILE:-}" ]]; then
    "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$port" --module "$module" "$@"
  elif [[ "$n" -gt 1 ]] && has_gpu; then
    "$PY" -m deepspeed.launcher.runner --num_gpus "$n" --master_port "$port" --module "$module" "$@"
  elif [[ "$n" -gt 1 ]]; then
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m torch.distributed.run --nproc_per_node "$n" \
      --master_port "$port" -m "$module" "$@"
  else
    "$PY" -m "$module" "$@"
  fi
}
