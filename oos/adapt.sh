#!/usr/bin/env bash
# Score the fold models a run kept with BatchNorm statistics re-estimated on each fold's held-out
# films (AdaBN, cxr/adapt.py; no labels, no training):
#   oos/adapt.sh reports/oos/candidates/NAME
# Writes DIR/adapt_bn/folds/*.csv and DIR/adapt_bn/results.{json,md}, to compare with
# DIR/results.* (the same models as they were trained).
set -euo pipefail
dir=${1:?usage: oos/adapt.sh RUN_DIR}
cd "$(dirname "$0")/.."
out="$dir/adapt_bn"
read -r folds tasks < <(python -m cxr.oos_runs plan "$dir/params.yaml") || exit 2
for fold in ${folds//,/ }; do
  models=()
  for task in ${tasks//,/ }; do
    models+=("--${task//_/-}" "$dir/models/${fold}_${task}.pt")
  done
  python stages/oos_score.py --fold "$fold" --params "$dir/params.yaml" --out "$out/folds" \
    --adapt-bn "${models[@]}"
done
python stages/oos_report.py --params "$dir/params.yaml" --folds "$out/folds" --out "$out" --pack
