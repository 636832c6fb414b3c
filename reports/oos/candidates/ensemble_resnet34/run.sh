#!/usr/bin/env bash
# RULE.md fifty-fifth amendment: default_zen5's and resnet34's binary fold models as one
# ensemble, the mean of their p(COVID-19) (for two classes, the mean softmax of
# `python -m cxr ensemble`), from their committed fold files (no training, no scoring). From the
# repository root:
#   bash reports/oos/candidates/ensemble_resnet34/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
dir=reports/oos/candidates/ensemble_resnet34
python - reports/oos/candidates/default_zen5/folds reports/oos/candidates/resnet34/folds "$dir/folds" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from cxr.oos_report import fold_file, mean_covid_scores
default, deeper, out = map(Path, sys.argv[1:])
out.mkdir(parents=True, exist_ok=True)
for fold in ("hannover", "europe", "world"):
    both = mean_covid_scores(pd.read_csv(fold_file(default, fold), keep_default_na=False),
                             pd.read_csv(fold_file(deeper, fold), keep_default_na=False))
    both.to_csv(out / f"{fold}.csv", index=False, float_format="%.6f")
    print(f"{fold}: {len(both)} films averaged")
PY
python stages/oos_report.py --params $dir/params.yaml --folds $dir/folds --out $dir --pack
