#!/usr/bin/env bash
# Two runs' binary fold models as one ensemble: the mean of their p(COVID-19) (for two classes,
# the mean softmax of `python -m cxr ensemble`), from their committed fold files (no training, no
# scoring), then the report. From the repository root:
#   bash oos/average.sh OUT_DIR FIRST_RUN_DIR SECOND_RUN_DIR
# OUT_DIR holds the params.yaml the report reads (the members' oos section).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
# The folds are OUT_DIR's params' (oos.folds), as oos/candidate.sh reads them.
read -r folds _ < <(python -m cxr.oos_runs plan "$dir/params.yaml") || exit 2
python - "$2/folds" "$3/folds" "$dir/folds" "$folds" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from cxr.oos_report import fold_file, mean_covid_scores
first, second, out = map(Path, sys.argv[1:4])
out.mkdir(parents=True, exist_ok=True)
for fold in sys.argv[4].split(","):
    both = mean_covid_scores(pd.read_csv(fold_file(first, fold), keep_default_na=False),
                             pd.read_csv(fold_file(second, fold), keep_default_na=False))
    both.to_csv(out / f"{fold}.csv", index=False, float_format="%.6f")
    print(f"{fold}: {len(both)} films averaged")
PY
python stages/oos_report.py --params "$dir/params.yaml" --folds "$dir/folds" --out "$dir" --pack
