#!/usr/bin/env bash
# One prepared GPU run for issue 12 (about 8 minutes on one H100/H200): prints one markdown table.
# Needs no network: every model is built offline with random weights (the reference vectors come from
# ../shared/reference). Each stage runs in its own process under a time limit; a failed or timed-out stage
# becomes a FAILED row and the run goes on. Stage logs: $OUT/<stage>.log.
#
#   bash bench/gpu.sh                      # on the GPU machine
#   bash bench/gpu.sh --tiny --device cpu  # dry run of every stage on a CPU (numbers meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d -t bora-gpu-XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

# stage name and its time limit in seconds: 440 s at most, plus ~10 s of start-up per stage (8 min worst case)
STAGES=(reference:30 sdpa:25 xl:90 batch:45 compile:150 t5:60 samplers:40)

run_stage() {
  local name=$1 limit=$2 rc=0
  shift 2
  limit=$((limit * ${LIMIT_SCALE:-1}))  # LIMIT_SCALE=10 for a dry run on a slow or loaded CPU
  timeout --kill-after=5 "$limit" "$PY" bench/gpu_bench.py --stage "$name" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"
    [ "$rc" -eq 124 ] && why="timed out after ${limit} s"
    echo "| $name | FAILED ($why) | $(tail -n 1 "$OUT/$name.log" | tr '|' '/' | cut -c1-160) |" >>"$OUT/$name.md"
  fi
}

{
  echo "# bench/gpu.sh $(date -u +%FT%TZ)"
  "$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.version.cuda, "|",
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' || true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} | tee "$OUT/header.txt"

start=$SECONDS
for stage in "${STAGES[@]}"; do
  run_stage "${stage%%:*}" "${stage##*:}" "$@"
done

echo
echo "| stage | setting | result |"
echo "|---|---|---|"
for stage in "${STAGES[@]}"; do
  cat "$OUT/${stage%%:*}.md"
done
echo
echo "total $((SECONDS - start)) s; logs in $OUT"
