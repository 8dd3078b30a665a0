#!/usr/bin/env bash
# Which departure from the published code mattered for SLIM? Each of four changes toggled back alone,
# SLIM at one kappa and the unintervened model on the validation questions (2 folds):
#   published    every default (the published code's choices)
#   csv_order    --question_order csv          (the CSV's order: each fold trains on one question type)
#   plain_texts  --dataset_name tqa_mc2_plain  (probe texts without the closing period)
#   best_probe   --probe_checkpoint best       (the best-validation epoch, not the last)
#   ledoit_wolf  --cov ledoit_wolf             (shrunk covariances, identity map below 10 samples)
# For each: SLIM's True*Info, True, Info, the share of decoded positions where its layer fired, and its
# paired difference from the unintervened model on the same questions (answered once per question order).
#
#   bash benchmarks/ablate_fidelity.sh               # after run_pipeline.sh; KAPPA: the sweep's choice, or 40
#   KAPPA=40 MODEL=smollm2_135M OUT_DIR=validation bash benchmarks/ablate_fidelity.sh
#
# Each variant writes under $OUT_DIR/ablation/<variant>/, sharing $OUT_DIR/features (linked); the table
# goes to paper/ablation_fidelity_<model>.md. Extra arguments go to every run. Reruns reuse what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh && slim_use_env  # the active environment, else .venv from install.sh (scripts/env.sh)
MODEL=${MODEL:-smollm2_135M}
OUT_DIR=${OUT_DIR:-validation}
best="$OUT_DIR/${MODEL}_best_slim.json"
if [ -z "${KAPPA:-}" ]; then
  # the sweep's kappa; at 0 SLIM moves nothing (and its detector is never run), so the published 40 instead
  KAPPA=$(python -c "import json, sys; v = json.load(open(sys.argv[1]))['value'] if __import__('os').path.exists(sys.argv[1]) else 0; print(f'{v:g}' if v else 40)" "$best")
fi
variants=(published csv_order plain_texts best_probe ledoit_wolf)
declare -A flags=(
  [published]=""
  [csv_order]="--question_order csv"
  [plain_texts]="--dataset_name tqa_mc2_plain"
  [best_probe]="--probe_checkpoint best"
  [ledoit_wolf]="--cov ledoit_wolf"
)
mkdir -p "$OUT_DIR/features"
written=$(mktemp); trap 'rm -f "$written"' EXIT
rows=(); labels=()
for v in "${variants[@]}"; do
  dir="$OUT_DIR/ablation/$v"
  mkdir -p "$dir"
  [ -e "$dir/features" ] || ln -s "$(cd "$OUT_DIR/features" && pwd)" "$dir/features"
  # The unintervened model's answers change only with the questions: answered for the published order and the
  # CSV's; the other variants are paired with the published run's (the first baseline given to the report).
  if [ "$v" = published ] || [ "$v" = csv_order ]; then
    order=(); [ "$v" = csv_order ] && order=(--question_order csv)
    python validate_2fold.py "$MODEL" --alpha 0 --num_fold 2 --use_mode val --out_dir "$dir" \
      --summary_out "$written" "${order[@]}" "$@"
    rows+=("$(head -n 1 "$written")"); labels+=("$v")
  fi
  # shellcheck disable=SC2086  # a variant's flags are separate words
  python ot_edit_layer.py "$MODEL" --num_fold 2 --bl 1.0 --alpha 0.1 --kappa "$KAPPA" --use_mode val \
    --out_dir "$dir" --summary_out "$written" ${flags[$v]} "$@"
  rows+=("$(head -n 1 "$written")"); labels+=("$v")
done
cmd=$(printf '%q ' bash benchmarks/ablate_fidelity.sh "$@")
python -m slim.evaluation.reports "${rows[@]}" --labels "${labels[@]}" --out "paper/ablation_fidelity_${MODEL//\//_}.md" \
  --title "$MODEL: SLIM at kappa $KAPPA with one departure toggled back (validation questions, 2 folds)" \
  --command "KAPPA=$KAPPA ${cmd% }"
