#!/bin/bash
# Usage: scripts/memory-limit-table.sh PATH/TO/cleave  (BENCHMARKS.md, "Allocator-measured peak memory")
# For each model, P and schedule (M = 4, one step): the `none` need, the smallest feasible
# limit the planner names, a limit 40% of the way from the smallest to `none`, and at that limit
# the plan's accounting and the allocator's measured peak per device: with recomputation and
# offload alone, and with the stash compressions as further choices (`--compress`; the MLP has
# no GELU, so no fewbit there).
C=$(realpath "$1")
cd "$(dirname "$0")/.."
# Columns `planned` and `measured` of the --memory-report rows (found by the header).
report() {
  awk '$1 == "device" { for (i = 1; i <= NF; i++) { if ($i == "planned") p = i; if ($i == "measured") m = i } }
       $1 ~ /^[0-9]+$/ && p { printf "%s/%s ", $p, $m }'
}
for mod in "examples/mlp-digits.cir examples/data/digits.safetensors bf16,int8,rank1" \
           "examples/gpt-tiny.cir examples/data/modadd.safetensors bf16,int8,fewbit,rank1"; do
  set -- $mod
  for P in 2 1; do
    if [ $P = 2 ]; then S="gpipe 1f1b zb-h1 zb-h2 auto interleaved zb-v"; else S="1f1b interleaved"; fi
    for s in $S; do
      common="$1 --data $2 --stages $P --microbatches 4 --schedule $s --steps 1 --quiet --seed 5 --optimizer sgd"
      none=$($C train $common --remat none --memory-report 2>&1 | report | tr ' /' '\n\n' | awk 'NR % 2 == 1' | sort -n | tail -1)
      small=$($C train $common --remat auto --memory-limit 1 2>&1 | sed -n 's/.*smallest feasible limit is \([0-9]*\).*/\1/p' | tail -1)
      lim=$(( small + (none - small) * 2 / 5 ))
      out=$($C train $common --remat auto --memory-limit $lim --memory-report 2>&1 | report)
      comp=$($C train ${common/ --quiet/} --remat auto --memory-limit $lim --memory-report --compress "$3" 2>&1)
      chosen=$(echo "$comp" | sed -n 's/^plan: --compress chosen for \([0-9]*\) value.*/\1/p')
      echo "$(basename $1) P=$P $s none=$none smallest=$small limit=$lim planned/measured: $out| compressed (${chosen:-0} values): $(echo "$comp" | report)"
    done
  done
done
