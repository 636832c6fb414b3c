#!/usr/bin/env bash
# RULE.md seventeenth amendment: the two Xeon seeds' fold models as one ensemble, scored on every fold
set -euo pipefail
cd "$(dirname "$0")/../../../.." && source .venv/bin/activate
dir=reports/oos/candidates/ensemble_xeon
mkdir -p $dir/models
cp params.yaml $dir/params.yaml
python reports/oos/candidates/ensemble_xeon/relabel.py
for fold in hannover europe world; do
  # check: the relabelled seed-42 model alone reproduces default_xeon's committed fold predictions
  python stages/oos_score.py --fold $fold --params $dir/params.yaml --out $dir/check42 --binary $dir/models/seed42/${fold}_binary.pt
  python -m cxr ensemble $dir/models/${fold}_binary.json $dir/models/seed42/${fold}_binary.pt $dir/models/seed43/${fold}_binary.pt
  python stages/oos_score.py --fold $fold --params $dir/params.yaml --out $dir/folds --binary $dir/models/${fold}_binary.json
done
python stages/oos_report.py --params $dir/params.yaml --folds $dir/folds --out $dir --pack
python - <<'PY'
import pandas as pd
for fold in ("hannover", "europe", "world"):
    a = pd.read_csv(f"reports/oos/candidates/ensemble_xeon/check42/{fold}.csv")
    b = pd.read_csv(f"reports/oos/candidates/default_xeon/folds/{fold}.csv.gz")  # packed since session 23
    m = a.merge(b, on=["path", "scored_as"], suffixes=("", "_committed"))
    print(fold, len(a), len(b), len(m), "max |p diff|", (m.p_covid - m.p_covid_committed).abs().max())
PY
