#!/bin/bash
# Usage: scripts/compress-table.sh PATH/TO/cleave
# BENCHMARKS.md, "Stash compression in the joint plan": the 32-layer d 4096 GPT (H100 profile,
# P = 4, M = 8). For keep/recompute/offload alone and with each stash compression added, the
# smallest feasible --memory-limit of the joint plan, and the joint plan at 1F1B's peak without
# recomputation: schedule, simulated step, effective bubble, values compressed. Simulations only.
set -euo pipefail
C=$(realpath "$1")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$C" new-model gpt --layers 32 --d-model 4096 --heads 32 --seq 1024 --batch 1 --vocab 50304 \
    -o "$tmp/gpt32.cir" > /dev/null
run() { "$C" inspect "$tmp/gpt32.cir" --memory --stages 4 --microbatches 8 --profile h100-sxm --json "$@"; }
limit=$(run --schedule 1f1b --remat none | jq '.peak_bytes | max | floor')
echo "limit (1F1B peak without recomputation): $limit B"
echo "| methods | smallest feasible limit | at 1F1B's peak: schedule | step (simulated) | effective bubble | values compressed (of candidates) | plans tried |"
echo "|---|---|---|---|---|---|---|"
for methods in none bf16 int8 fewbit rank1 bf16,fewbit int8,fewbit,rank1 bf16,fewbit,rank1; do
  args=()
  [ "$methods" != none ] && args=(--compress "$methods")
  smallest=$(run --schedule auto --memory-limit 1 "${args[@]}" 2>&1 >/dev/null \
      | grep -o 'smallest feasible limit is [0-9]*' | tail -1 | grep -o '[0-9]*$' || true)
  run --schedule auto --memory-limit "$limit" "${args[@]}" 2>/dev/null | jq -r \
      --arg m "$methods" --arg s "$smallest" '
    "| \($m) | \($s) B | \(.schedule) | \(.makespan_s * 1e6 | round / 1e3) ms | "
    + "\(.effective_bubble_rate * 10000 | round / 10000) | "
    + (if .compress then "\(.compress.chosen) (of \(.compress.values | length))" else "—" end)
    + " | " + (if .compress then "\(.compress.tried | length)" else "1" end) + " |"'
done
