#!/usr/bin/env bash
# Seed ensembles on held-out places: train each fold once per seed, then score the seeds' fold
# models as one ensemble (mean softmax), no further training:
#   oos/seeds.sh reports/oos/seeds 42 43      (the folder holds the run's params.yaml)
# Writes DIR/seed<S>/ for each seed (params.yaml with base.seed S, then what oos/candidate.sh
# writes: folds/, results.*, models/ kept outside git) and DIR/ensemble/ (manifests in models/,
# folds/*.csv, results.{json,md}) to compare with each seed alone. A seed folder that already has
# a fold's model is not trained again (re-run to go on after an interruption).
set -euo pipefail
dir=${1:?usage: oos/seeds.sh DIR SEED [SEED ...]}
shift
[ $# -ge 1 ] || { echo "usage: oos/seeds.sh DIR SEED [SEED ...]" >&2; exit 2; }
cd "$(dirname "$0")/.."
read -r folds tasks < <(python -m cxr.oos_runs plan "$dir/params.yaml") || exit 2
for seed in "$@"; do
  run="$dir/seed$seed"
  mkdir -p "$run"
  python -m cxr.oos_runs with-seed "$dir/params.yaml" "$seed" "$run/params.yaml"
  for fold in ${folds//,/ }; do
    done_all=1
    for task in ${tasks//,/ }; do [ -f "$run/models/${fold}_${task}.pt" ] || done_all=0; done
    [ "$done_all" = 1 ] && continue
    python stages/oos.py --fold "$fold" --params "$run/params.yaml" --out "$run/folds" --models "$run/models"
  done
  python stages/oos_report.py --params "$run/params.yaml" --folds "$run/folds" --out "$run" --pack
done
out="$dir/ensemble"
mkdir -p "$out/models"
for fold in ${folds//,/ }; do
  models=()
  for task in ${tasks//,/ }; do
    members=()
    for seed in "$@"; do members+=("$dir/seed$seed/models/${fold}_${task}.pt"); done
    manifest="$out/models/${fold}_${task}.json"
    python -m cxr ensemble "$manifest" "${members[@]}"
    models+=("--${task//_/-}" "$manifest")
  done
  python stages/oos_score.py --fold "$fold" --params "$dir/params.yaml" --out "$out/folds" "${models[@]}"
done
python stages/oos_report.py --params "$dir/params.yaml" --folds "$out/folds" --out "$out" --pack
