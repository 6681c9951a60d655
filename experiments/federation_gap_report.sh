#!/usr/bin/env bash
# The records and tables of docs/FEDERATION.md from the runs of experiments/federation_gap.sh:
# curves (validation against passes and wall time), test records per recipe (finished seeds), and
# the paired comparisons of each finished seed with the centralized twin of the same seed (test, all
# users, 10,000 resamples, targets sliced at 10 training interactions). Unfinished runs contribute
# their curves only; a dataset without runs under OUT keeps its committed records.
#   experiments/federation_gap_report.sh [amazon] [axes] [ml1m]   (OUT=runs/gap, writes docs/results/federation-gap/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
OUT=${OUT:-runs/gap}
D=docs/results/federation-gap
mkdir -p "$D"
existing() { for d in "$@"; do if [ -d "$d" ]; then echo "$d"; fi; done; }
validated() { for d in "$@"; do if grep -qs '"valid"' "$d/metrics.jsonl"; then echo "$d"; fi; done; }
finished() { for d in "$@"; do if [ -f "$d/summary.json" ]; then echo "$d"; fi; done; }

# records PREFIX BASE RECIPE...: results of the centralized twins and of each recipe, and each
# finished seed of a recipe paired with its twin
records() {
  local prefix=$1 base=$2; shift 2
  local twins; twins=$(finished "$base"/seed202?/centralized)
  [ -z "$twins" ] || "$PY" run.py results $twins --out "$D/$prefix-centralized.json" > "$D/$prefix-centralized.md"
  for recipe in "$@"; do
    local runs; runs=$(finished "$base"/seed202?/"$recipe")
    [ -n "$runs" ] || continue
    local name=${recipe#"$prefix"-}  # ml1m-c64-cos: ml1m-c64-cos.json, not ml1m-ml1m-c64-cos.json
    results_record "$D/$prefix-$name" $runs
    for d in $runs; do
      local seed; seed=$(basename "$(dirname "$d")")
      [ -f "$base/$seed/centralized/summary.json" ] || continue  # no twin of that seed (yet)
      compare_record "$D/$prefix-compare-$name-$seed" "$base/$seed/centralized" "$d" --item-count-bins 10
    done
  done
}

amazon() {
  local B=$OUT/amazon recipes=(${RECIPES:-c256-cos c256-cos-lr2})
  local runs=("$B/seed2020/centralized" "$B/seed2020/c512-cos")
  for recipe in "${recipes[@]}"; do runs+=("$B"/seed202?/"$recipe"); done
  "$PY" run.py curves $(existing "${runs[@]}") --out "$D/beauty-curves.png" --json "$D/beauty-curves.json" \
      > "$D/beauty-curves.md"
  records beauty "$B" "${recipes[@]}"
}

# axes: the study's other axes on Beauty, seed 2020 (c256-cos with one server or client setting
# changed, and 1,024 clients a round), beside the committed curves of the seed-2020 c256-cos and
# centralized twin (their folders are gone), and the test record of each finished one
axes() {
  local B=$OUT/amazon/seed2020 C=$D/beauty-curves.json
  local runs=("$B"/c256-cos-tau6 "$B"/c256-cos-tau5 "$B"/c256-cos-b99 "$B"/c1024-cos "$B"/c256-cos-e2 "$B"/c256-cos-e3)
  "$PY" run.py curves $(validated "${runs[@]}") --record "$C#seed2020/centralized" --record "$C#seed2020/c256-cos" \
      --out "$D/beauty-axes-curves.png" --json "$D/beauty-axes-curves.json" > "$D/beauty-axes-curves.md"
  # one record per run: they share a config name and a seed, so one record would average them as seeds
  for run in $(finished "${runs[@]}"); do results_record "$D/beauty-$(basename "$run")" "$run"; done
}

# ml1m-curves.* keep the first recipe tried (ml1m-c128-cos, stopped at 3 passes); ml1m-c64-curves.*
# are the 64-client recipes beside their centralized twins
ml1m() {
  local B=$OUT/ml1m
  "$PY" run.py curves $(existing "$B"/seed202?/centralized "$B"/seed202?/ml1m-c64-cos "$B"/seed202?/ml1m-c64-cos15) \
      --out "$D/ml1m-c64-curves.png" --json "$D/ml1m-c64-curves.json" > "$D/ml1m-c64-curves.md"
  records ml1m "$B" ml1m-c64-cos ml1m-c64-cos15
}

[ $# -gt 0 ] || set -- amazon ml1m
for report in "$@"; do
  case $report in
    amazon) needs=$OUT/amazon/seed2020/centralized;;  # its curves are drawn around the seed-2020 twin
    axes) needs=$OUT/amazon;;
    ml1m) needs=$OUT/ml1m;;
    *) echo "unknown report $report (amazon, axes or ml1m)" >&2; exit 2;;
  esac
  if [ -d "$needs" ]; then "$report"; else echo "no $needs: the $report records stay as they are" >&2; fi
done
ls -l "$D"
