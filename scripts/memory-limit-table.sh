#!/bin/bash
# Usage: scripts/memory-limit-table.sh PATH/TO/cleave  (BENCHMARKS.md, "Allocator-measured peak memory")
C=$1
cd "$(dirname "$0")/.."
for mod in "examples/mlp-digits.cir examples/data/digits.safetensors" "examples/gpt-tiny.cir examples/data/modadd.safetensors"; do
  set -- $mod
  for P in 2 1; do
    if [ $P = 2 ]; then S="gpipe 1f1b zb-h1 zb-h2 auto interleaved zb-v"; else S="1f1b interleaved"; fi
    for s in $S; do
      common="$1 --data $2 --stages $P --microbatches 4 --schedule $s --steps 1 --quiet --seed 5 --optimizer sgd"
      none=$($C train $common --remat none --memory-report 2>&1 | awk '$1 ~ /^[0-9]+$/ && NF==12 {print $9}' | sort -n | tail -1)
      small=$($C train $common --remat auto --memory-limit 1 2>&1 | sed -n 's/.*smallest feasible limit is \([0-9]*\).*/\1/p')
      lim=$(( small + (none - small) * 2 / 5 ))
      out=$($C train $common --remat auto --memory-limit $lim --memory-report 2>&1 | awk '$1 ~ /^[0-9]+$/ && NF==12 {printf "%s/%s ", $9, $10}')
      echo "$(basename $1) P=$P $s none=$none smallest=$small limit=$lim planned/measured: $out"
    done
  done
done
