#!/usr/bin/env bash
# RULE.md fifty-first amendment: default_zen5's and logit_penalty's binary fold models as one
# ensemble (oos/average.sh: the mean of their p(COVID-19), from their committed fold files). From
# the repository root:
#   bash reports/oos/candidates/ensemble_logit_penalty/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
bash oos/average.sh reports/oos/candidates/ensemble_logit_penalty \
  reports/oos/candidates/default_zen5 reports/oos/candidates/logit_penalty
