#!/usr/bin/env bash
# RULE.md forty-sixth amendment: default_zen5's three seeds' fold models (kept outside git) as one
# ensemble (mean softmax) on every fold's held-out films, no training. From the repository root:
#   bash reports/oos/candidates/ensemble_zen5/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
dir=reports/oos/candidates/ensemble_zen5
runs=(reports/oos/candidates/default_zen5 reports/oos/candidates/default_zen5_seed43 reports/oos/candidates/default_zen5_seed44)
for fold in hannover europe world; do
  # the check: seed 42's model alone reproduces its committed fold predictions
  python stages/oos_score.py --fold $fold --params $dir/params.yaml --out $dir/check --binary ${runs[0]}/models/${fold}_binary.pt
  python -m cxr ensemble $dir/models/${fold}_binary.json "${runs[@]/%//models/${fold}_binary.pt}"
  python stages/oos_score.py --fold $fold --params $dir/params.yaml --out $dir/folds --binary $dir/models/${fold}_binary.json
done
python - "$dir/check" "${runs[0]}/folds" <<'PY'
import sys
import pandas as pd
from cxr.oos_report import largest_difference
check, committed = sys.argv[1:]
for fold in ("hannover", "europe", "world"):
    a, b = pd.read_csv(f"{check}/{fold}.csv"), pd.read_csv(f"{committed}/{fold}.csv.gz")
    diff = largest_difference(a, b, ["p_covid"])
    print(f"{fold}: {len(a)} films, max |p diff| {diff:.2e}")
    assert diff < 1e-5, "the check failed: nothing is judged"
PY
python stages/oos_report.py --params $dir/params.yaml --folds $dir/folds --out $dir --pack
rm -r $dir/check
