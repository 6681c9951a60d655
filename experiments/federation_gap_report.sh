#!/usr/bin/env bash
# The records and tables of docs/FEDERATION.md from the runs of experiments/federation_gap.sh:
# curves (validation against passes and wall time), test records per recipe, and the paired
# comparisons of each recipe with its centralized twin (test, all users, 10,000 resamples, targets
# sliced at 10 training interactions). Unfinished runs contribute their curves only.
#   experiments/federation_gap_report.sh                (OUT=runs/gap, writes docs/results/federation-gap/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gap}
D=docs/results/federation-gap
RECIPES=${RECIPES:-c256-cos c256-cos-lr2}
mkdir -p "$D"
B=$OUT/amazon
existing() { for d in "$@"; do [ -d "$d" ] && echo "$d"; done; }

runs=("$B/seed2020/centralized" "$B/seed2020/c512-cos")
for recipe in $RECIPES; do runs+=("$B"/seed202?/"$recipe"); done
"$PY" run.py curves $(existing "${runs[@]}") --out "$D/beauty-curves.png" --json "$D/beauty-curves.json" \
    > "$D/beauty-curves.md"
"$PY" run.py results "$B/seed2020/centralized" --out "$D/beauty-centralized.json" > "$D/beauty-centralized.md"
for recipe in $RECIPES; do
  finished=(); for d in "$B"/seed202?/"$recipe"; do [ -f "$d/summary.json" ] && finished+=("$d"); done
  [ ${#finished[@]} -gt 0 ] || continue
  "$PY" run.py results "${finished[@]}" --out "$D/beauty-$recipe.json" > "$D/beauty-$recipe.md"
  for d in "${finished[@]}"; do
    seed=$(basename "$(dirname "$d")")
    "$PY" run.py compare "$B/$seed/centralized" "$d" --item-count-bins 10 \
        --json "$D/beauty-compare-$recipe-$seed.json" > "$D/beauty-compare-$recipe-$seed.md" 2>/dev/null \
      || rm -f "$D/beauty-compare-$recipe-$seed.json" "$D/beauty-compare-$recipe-$seed.md"  # no twin of that seed
  done
done

M=$OUT/ml1m/seed2020/ml1m-c128-cos
if [ -d "$M" ]; then
  "$PY" run.py curves "$M" --out "$D/ml1m-curves.png" --json "$D/ml1m-curves.json" > "$D/ml1m-curves.md"
  if [ -f "$M/summary.json" ]; then
    "$PY" run.py results "$M" --out "$D/ml1m-c128-cos.json" > "$D/ml1m-c128-cos.md"
  fi
fi
ls -l "$D"
