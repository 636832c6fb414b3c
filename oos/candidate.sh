#!/usr/bin/env bash
# Run one candidate configuration through the out-of-source folds, outside DVC's lock:
#   oos/candidate.sh reports/oos/candidates/NAME [SPLIT]   (the folder holds the candidate's params.yaml)
# SPLIT (default data/split) must have been made with the candidate's base and split params: a
# candidate that changes them needs its own (python stages/split.py --params NAME/params.yaml
# --raw data/raw --out SPLIT --metrics NAME/data.json); stages/oos.py refuses arrays of another size.
# Writes NAME/folds/*.csv.gz|json (the report packs the CSVs) and NAME/results.{json,md}, like
# `dvc repro oos/dvc.yaml` does for params.yaml, and keeps the fold models in NAME/models/ (not in
# git) for oos/tta.sh.
# Folds and the budget (oos.*) come from the candidate's params.yaml.
set -euo pipefail
dir=${1:?usage: oos/candidate.sh reports/oos/candidates/NAME [SPLIT]}
data=${2:-data/split}
cd "$(dirname "$0")/.."
read -r folds _ < <(python -m cxr.oos_runs plan "$dir/params.yaml") || exit 2
for fold in ${folds//,/ }; do
  python stages/oos.py --fold "$fold" --params "$dir/params.yaml" --data "$data" --out "$dir/folds" \
    --models "$dir/models"
done
python stages/oos_report.py --params "$dir/params.yaml" --folds "$dir/folds" --out "$dir" --pack
