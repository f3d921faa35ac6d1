#!/usr/bin/env bash
# Training-step benchmark (llava-contrastive bench) with the project environment; writes OUT/bench.json,
# OUT/bench.md (the tables of BENCHMARKS.md), OUT/bench.log, OUT/machine.txt; OUT defaults to /tmp/llava-contrastive-bench-out.
# Environment (all optional):
#   SHAPE=tiny|small|both (both)  ROUNDS (30)  WARMUP (1)  STEPS (1: steps per variant per round)
#   BATCH (8)  VARIANTS (a,b,c,d,dc,e,f,g)  THREADS (1)  OUT (bench-out)  MEMORY=1 (on)  DATA=1 (on)
#   PROFILE=c,d  (torch.profiler tables of one step per listed variant)
# Extra arguments go to the benchmark. Run it on a quiet machine (nothing else on the cores; the
# per-round load average is logged): on a shared one the time verdicts come out "unresolved".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tiny_assets
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-${TMPDIR:-/tmp}/llava-contrastive-bench-out}"
mkdir -p "$OUT"
flags=(--shape "${SHAPE:-both}" --rounds "${ROUNDS:-30}" --warmup "${WARMUP:-1}" --steps_per_round "${STEPS:-1}"
       --batch "${BATCH:-8}" --variants "${VARIANTS:-a,b,c,d,dc,e,f,g}" --threads "${THREADS:-1}"
       --json "$OUT/bench.json" --markdown "$OUT/bench.md")
[[ "${MEMORY:-1}" == 1 ]] && flags+=(--memory)
[[ "${DATA:-1}" == 1 ]] && flags+=(--data)
[[ -n "${PROFILE:-}" ]] && flags+=(--profile "$PROFILE")
{ echo "## Machine"; lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|L2|L3)'; uptime
  "$PY" -c "import torch; print('torch', torch.__version__, 'default threads', torch.get_num_threads())"; } > "$OUT/machine.txt"
cd "$repo"
"$PY" -m llava_contrastive bench "${flags[@]}" "$@" | tee "$OUT/bench.log"
echo "bench: $OUT/bench.md $OUT/bench.json" >&2
