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

# resolve_nodes: the launcher (LAUNCHER, below) and the node count NNODES. NNODES comes from HOSTFILE
# (one host per non-comment line) or, under SLURM, from SLURM_JOB_NUM_NODES when unset; an NNODES that
# disagrees with either is refused, since the gradient accumulation (hence the global batch) is
# computed for NUM_GPUS x NNODES ranks.
#   LAUNCHER=auto (default): deepspeed-hostfile with HOSTFILE; slurm inside a multi-node SLURM
#            allocation; torchrun-multinode when NNODES > 1; else deepspeed (several GPUs),
#            torchrun (several CPU ranks) or single (one process).
#   LAUNCHER=deepspeed-hostfile | slurm | torchrun-multinode | deepspeed | torchrun | single to choose.
#   torchrun-multinode: run the script on every node with NNODES, NODE_RANK and MASTER_ADDR set.
#   slurm: run the script once from the sbatch script; it starts one torchrun per node with srun
#          (c10d rendezvous on the first node of SLURM_JOB_NODELIST, or MASTER_ADDR).
#   DRY_RUN=1: print the plan and the launch command, run nothing.
nodes_refused() { echo "$1" >&2; exit 2; }

resolve_nodes() {
  local want="${LAUNCHER:-auto}" n
  if [[ "$want" == auto ]]; then
    if [[ -n "${HOSTFILE:-}" ]]; then want=deepspeed-hostfile
    elif [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]]; then want=slurm
    elif [[ "${NNODES:-1}" -gt 1 ]]; then want=torchrun-multinode
    fi
  fi
  case "$want" in
    deepspeed-hostfile)
      [[ -n "${HOSTFILE:-}" ]] || nodes_refused "LAUNCHER=deepspeed-hostfile needs HOSTFILE (a DeepSpeed hostfile: 'host slots=N' per line)"
      [[ -f "$HOSTFILE" ]] || nodes_refused "HOSTFILE=$HOSTFILE: no such file (a DeepSpeed hostfile: 'host slots=N' per line)"
      n=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
      if [[ -n "${NNODES:-}" && "$NNODES" != "$n" ]]; then
        nodes_refused "NNODES=$NNODES but HOSTFILE=$HOSTFILE lists $n host(s): the global batch would be computed for the wrong number of ranks. Set NNODES=$n, or leave NNODES unset to take it from the hostfile."
      fi
      NNODES=$n ;;
    slurm)
      [[ -n "${SLURM_JOB_NUM_NODES:-}" ]] || nodes_refused "LAUNCHER=slurm outside a SLURM allocation (no SLURM_JOB_NUM_NODES): submit the script with sbatch, or pick another LAUNCHER."
      if [[ -n "${NNODES:-}" && "$NNODES" != "$SLURM_JOB_NUM_NODES" ]]; then
        nodes_refused "NNODES=$NNODES but the SLURM allocation has $SLURM_JOB_NUM_NODES node(s) (SLURM_JOB_NUM_NODES): the global batch would be computed for the wrong number of ranks. Leave NNODES unset under SLURM."
      fi
      NNODES=$SLURM_JOB_NUM_NODES
      if [[ -z "${MASTER_ADDR:-}" ]]; then
        command -v scontrol >/dev/null || nodes_refused "LAUNCHER=slurm: set MASTER_ADDR (scontrol not found to take the first node of SLURM_JOB_NODELIST)"
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
      fi ;;
    torchrun-multinode)
      : "${NNODES:?LAUNCHER=torchrun-multinode needs NNODES}"
      [[ -n "${MASTER_ADDR:-}" && -n "${NODE_RANK:-}" ]] || nodes_refused "NNODES=$NNODES with torchrun: run this script on every node with NODE_RANK (0..$(( NNODES - 1 ))) and MASTER_ADDR (the address of node 0) set; or use HOSTFILE (DeepSpeed) or SLURM."
      ;;
    deepspeed|torchrun|single)
      [[ "${NNODES:-1}" == 1 ]] || nodes_refused "LAUNCHER=$want runs on one node but NNODES=$NNODES: use LAUNCHER=torchrun-multinode, slurm or deepspeed-hostfile." ;;
    auto)
      [[ "${NNODES:-1}" == 1 ]] || nodes_refused "NNODES=$NNODES: pick LAUNCHER=torchrun-multinode, slurm or deepspeed-hostfile."
      if [[ "${NUM_GPUS:-1}" -gt 1 ]] && has_gpu; then want=deepspeed
      elif [[ "${NUM_GPUS:-1}" -gt 1 ]]; then want=torchrun
      else want=single
      fi ;;
    *) nodes_refused "LAUNCHER=$want: expected auto, deepspeed-hostfile, slurm, torchrun-multinode, deepspeed, torchrun or single" ;;
  esac
  LAUNCHER="$want"
  NNODES="${NNODES:-1}"
}

# plan_batch NAME DEFAULT_PER_DEVICE CONTRASTIVE(0|1): ranks, per-device batch (DEFAULT_PER_DEVICE, or
# less so that one optimizer step is GLOBAL_BATCH), accumulation; refuses a GLOBAL_BATCH the ranks
# cannot make; prints the plan (world size, global batch, negatives per sample) before anything starts.
plan_batch() {
  local name="$1" per_device="$2" contrastive="$3" negatives=""
  ranks=$(( NUM_GPUS * NNODES ))
  if [[ -z "${PER_DEVICE_BATCH:-}" ]]; then
    PER_DEVICE_BATCH=$(( GLOBAL_BATCH / ranks < per_device ? GLOBAL_BATCH / ranks : per_device ))
  fi
  ACCUM=$(( PER_DEVICE_BATCH > 0 ? GLOBAL_BATCH / (ranks * PER_DEVICE_BATCH) : 0 ))
  if [[ "$ACCUM" -lt 1 || $(( ACCUM * ranks * PER_DEVICE_BATCH )) -ne "$GLOBAL_BATCH" ]]; then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of ranks ($ranks = $NNODES node(s) x $NUM_GPUS) x" \
         "PER_DEVICE_BATCH (${PER_DEVICE_BATCH:-unset}): set GLOBAL_BATCH or PER_DEVICE_BATCH so that it is" >&2
    exit 2
  fi
  [[ "$contrastive" == 1 ]] && negatives="; contrastive negatives per sample: $(( ranks * PER_DEVICE_BATCH - 1 )) (gathered over ranks, per micro-batch)"
  echo "$name: launcher $LAUNCHER, world size $ranks ($NNODES node(s) x $NUM_GPUS) x batch $PER_DEVICE_BATCH" \
       "x accumulation $ACCUM = global batch $GLOBAL_BATCH$negatives" >&2
}

# launch MODULE ARGS...: start the training under LAUNCHER (resolve_nodes); DRY_RUN=1 prints only.
launch() {
  local module="$1"; shift
  local n="${NUM_GPUS:-$(default_num_gpus)}"
  local port="${MASTER_PORT:-$(( 29500 + $(printf '%s' "${OUTPUT_DIR:-x}" | cksum | cut -d' ' -f1) % 2000 ))}"
  local cmd
  case "${LAUNCHER:-single}" in
    deepspeed-hostfile) cmd=("$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_nodes "$NNODES"
                             --num_gpus "$n" --master_port "$port" --module "$module") ;;
    slurm) cmd=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit 1
                "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$n" --rdzv_backend c10d
                --rdzv_endpoint "$MASTER_ADDR:$port" --rdzv_id "${SLURM_JOB_ID:-llava-contrastive}" -m "$module") ;;
    torchrun-multinode) cmd=("$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
                             --nproc_per_node "$n" --master_addr "$MASTER_ADDR" --master_port "$port" -m "$module") ;;
    deepspeed) cmd=("$PY" -m deepspeed.launcher.runner --num_gpus "$n" --master_port "$port" --module "$module") ;;
    torchrun) export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
              cmd=("$PY" -m torch.distributed.run --nproc_per_node "$n" --master_port "$port" -m "$module") ;;
    *) cmd=("$PY" -m "$module") ;;
  esac
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf 'dry run (DRY_RUN=1), not started:' >&2; printf ' %q' "${cmd[@]}" "$@" >&2; echo >&2
    exit 0
  fi
  "${cmd[@]}" "$@"
}
