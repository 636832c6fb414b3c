#!/usr/bin/env bash
# RULE.md fifty-fifth amendment: default_zen5's and resnet34's binary fold models as one ensemble
# (oos/average.sh: the mean of their p(COVID-19), from their committed fold files). From the
# repository root:
#   bash reports/oos/candidates/ensemble_resnet34/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
bash oos/average.sh reports/oos/candidates/ensemble_resnet34 \
  reports/oos/candidates/default_zen5 reports/oos/candidates/resnet34
