#!/bin/bash
# Usage: scripts/joint-choice-table.sh PATH/TO/cleave
# BENCHMARKS.md, "Recomputation and offload under 1F1B's peak memory": for each model, the limit
# is 1F1B's simulated peak without recomputation; ZB-H1 alone and the joint choice
# (`--schedule auto --memory-limit`) are simulated against it. Simulations only (shapes).
set -euo pipefail
C=$(realpath "$1")
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$C" new-model gpt --layers 32 --d-model 4096 --heads 32 --seq 1024 --batch 1 --vocab 50304 \
    -o "$tmp/gpt32.cir" > /dev/null
echo "| model, P, M, profile | limit (1F1B peak) | 1F1B bubble | ZB-H1 alone: bubble, peak | joint: chosen, bubble / effective, peak, makespan vs ZB-H1 |"
echo "|---|---|---|---|---|"
while read -r model p m profile; do
  [ "$model" = gpt32 ] && model="$tmp/gpt32.cir"
  run() { "$C" inspect "$model" --memory --stages "$p" --microbatches "$m" --profile "$profile" --json "$@"; }
  one=$(run --schedule 1f1b --remat none)
  limit=$(jq '.peak_bytes | max | floor' <<< "$one")
  zb=$(run --schedule zb-h1 --remat none)
  joint=$(run --schedule auto --memory-limit "$limit")
  jq -r --argjson one "$one" --argjson zb "$zb" --arg name "$(basename "$model" .cir), $p, $m, $profile" \
      --argjson limit "$limit" '
    def sum(f): [.stages[] | f] | add;
    "| \($name) | \($limit) B | \($one.bubble_rate * 10000 | round / 10000) | "
    + "\($zb.bubble_rate * 10000 | round / 10000), \($zb.peak_bytes | max | floor) B "
    + "(\((($zb.peak_bytes | max) / $limit - 1) * 1000 | round / 10) % over) | "
    + "\(.schedule): recompute \(sum(.recomputed_flops) / 1e6 * 100 | round / 100) MFLOP, "
    + "offload \(sum(.offloaded_bytes)) B, hand-off \(sum(.handed_bytes)) B; "
    + "\(.bubble_rate * 10000 | round / 10000) / \(.effective_bubble_rate * 10000 | round / 10000), "
    + "\(.peak_bytes | max | floor) B, \((.makespan_s / $zb.makespan_s - 1) * 10000 | round / 100) % |"
  ' <<< "$joint"
done <<'CASES'
examples/gpt-tiny.cir 2 4 cpu-epyc-2core
examples/gpt-tiny.cir 4 8 cpu-epyc-2core
examples/mlp-digits.cir 2 4 cpu-epyc-2core
gpt32 4 8 h100-sxm
gpt32 8 16 h100-sxm
CASES
