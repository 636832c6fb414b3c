#!/usr/bin/env bash
# RULE.md forty-eighth amendment: the binary and four-class fold models' p(COVID-19) averaged on
# every fold's films, from their committed fold files (no training, no scoring). From the
# repository root, after oos/candidate.sh has run four_class_folds[_seed43]:
#   bash reports/oos/candidates/mean_scores/run.sh [_seed43]
set -euo pipefail
cd "$(dirname "$0")/../../../.."
seed=${1:-}
dir=reports/oos/candidates/mean_scores$seed
binary=reports/oos/candidates/default_zen5$seed
four=reports/oos/candidates/four_class_folds$seed
python - "$binary/folds" "$four/folds" "reports/oos/candidates/four_class_zen5$seed/folds" "$dir/folds" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from cxr.oos_report import fold_file, largest_difference, mean_covid_scores
binary, four, europe_before, out = map(Path, sys.argv[1:])
# The check: the europe fold's four-class models reproduce the committed run of the same
# configuration on the same CPU kind, or nothing is judged.
a, b = pd.read_csv(fold_file(four, "europe")), pd.read_csv(fold_file(europe_before, "europe"))
diff = largest_difference(a, b, ["p4_covid", "p4_viral", "p4_bacterial", "p4_normal"])
print(f"europe: {len(a)} films, max |p diff| {diff:.2e}")
assert diff < 1e-5, "the check failed: nothing is judged"
out.mkdir(parents=True, exist_ok=True)
for fold in ("hannover", "europe", "world"):
    both = mean_covid_scores(pd.read_csv(fold_file(binary, fold), keep_default_na=False),
                             pd.read_csv(fold_file(four, fold), keep_default_na=False))
    both.to_csv(out / f"{fold}.csv", index=False, float_format="%.6f")
PY
python stages/oos_report.py --params $dir/params.yaml --folds $dir/folds --out $dir --pack
