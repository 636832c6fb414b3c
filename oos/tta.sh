#!/usr/bin/env bash
# Score test-time augmentation on held-out places with the fold models a run kept, no training:
#   oos/tta.sh reports/oos/four_class NAME VIEW [VIEW ...]     e.g. ... gamma gamma_0.8 gamma_1.25
# For each fold of DIR/params.yaml and each task of its oos.tasks, writes an ensemble manifest of
# DIR/models/<fold>_<task>.pt with the views (python -m cxr ensemble), scores the fold's films with
# it (stages/oos_score.py) and pools them: DIR/tta/NAME/folds/*.csv and results.{json,md}, to
# compare with DIR/results.* (the same models without the views).
set -euo pipefail
dir=${1:?usage: oos/tta.sh RUN_DIR NAME VIEW [VIEW ...]}
name=${2:?usage: oos/tta.sh RUN_DIR NAME VIEW [VIEW ...]}
shift 2
cd "$(dirname "$0")/.."
out="$dir/tta/$name"
read -r folds tasks < <(python -m cxr.oos_runs plan "$dir/params.yaml") || exit 2
for fold in ${folds//,/ }; do
  models=()
  for task in ${tasks//,/ }; do
    manifest="$dir/models/${fold}_${task}_$name.json"
    python -m cxr ensemble "$manifest" "$dir/models/${fold}_${task}.pt" --tta "$@"
    models+=("--${task//_/-}" "$manifest")
  done
  python stages/oos_score.py --fold "$fold" --params "$dir/params.yaml" --out "$out/folds" "${models[@]}"
done
python stages/oos_report.py --params "$dir/params.yaml" --folds "$out/folds" --out "$out" --pack
