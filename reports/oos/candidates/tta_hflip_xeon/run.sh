#!/usr/bin/env bash
# RULE.md eighteenth amendment: the size-corrected default_xeon fold models (seeds 42 and 43, kept
# by ensemble_xeon) scored on every fold with a horizontal-flip test-time view, no training.
#   bash reports/oos/candidates/tta_hflip_xeon/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
kept=reports/oos/candidates/ensemble_xeon/models
for seed in 42 43; do
  dir=reports/oos/candidates/tta_hflip_xeon$([ $seed = 43 ] && echo _seed43 || true)
  base=reports/oos/candidates/default_xeon$([ $seed = 43 ] && echo _seed43 || true)
  sed "s/^  seed: 42$/  seed: $seed/" params.yaml > "$dir/params.yaml"
  grep -q "^  seed: $seed$" "$dir/params.yaml"
  for fold in hannover europe world; do
    # the check: the same model without the view reproduces the committed fold predictions
    python stages/oos_score.py --fold $fold --params "$dir/params.yaml" --out "$dir/check" \
      --binary $kept/seed$seed/${fold}_binary.pt
    python -m cxr ensemble "$dir/models/${fold}_binary.json" $kept/seed$seed/${fold}_binary.pt --tta hflip
    python stages/oos_score.py --fold $fold --params "$dir/params.yaml" --out "$dir/folds" \
      --binary "$dir/models/${fold}_binary.json"
  done
  python stages/oos_report.py --params "$dir/params.yaml" --folds "$dir/folds" --out "$dir" --pack
  python - "$dir/check" "$base/folds" <<'PY'
import sys
import pandas as pd
check, committed = sys.argv[1:]
for fold in ("hannover", "europe", "world"):
    a, b = pd.read_csv(f"{check}/{fold}.csv"), pd.read_csv(f"{committed}/{fold}.csv.gz")  # packed since session 23
    m = a.merge(b, on=["path", "scored_as"], suffixes=("", "_committed"))
    diff = (m.p_covid - m.p_covid_committed).abs().max()
    print(f"{check} {fold}: {len(a)} scored, {len(b)} committed, {len(m)} matched, max |p diff| {diff:.2e}")
    assert len(a) == len(b) == len(m) and diff < 1e-5, "the check failed: nothing is judged"
PY
done
