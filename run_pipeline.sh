#!/usr/bin/env bash
# The whole pipeline on one model, offline by default, ending in the comparison table.
#
#   bash run_pipeline.sh                 # quick: the first 300 questions, 60 scored per fold and method
#   FULL=1 bash run_pipeline.sh          # all 817 questions, every test question scored
#   MODEL=llama_7B FULL=1 bash run_pipeline.sh --device 0 --judge_name <ft-judge> --info_name <ft-info>
#
# Steps: stage 1 (probes, layer choice, Figure 1), the kappa sweep of SLIM and the alpha
# sweep of ITI on the validation questions, then the test runs of the unintervened model,
# ITI, SLIM and MiMiC with the chosen knobs, and the table in paper/.
# Extra arguments go to every Python command (e.g. --device, --judge_name, --info_name).
# ENGINE=ray (scripts/engine.sh): the sweeps' values, then the two test processes, run as Ray tasks at once.
# PAPER_DIR (default paper) receives the table and, when set or in the full run, Figure 1; ROWS_OUT, when set,
# receives the table's summary paths, one per line (reproduce.sh adds rows to the table). FIGURE_BLS (e.g.
# "0.6 1.0 2.0"), when set, adds Figure 1(b): stage 1's probes trained again for each bl.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/env.sh && slim_use_env  # the active environment, else .venv from install.sh (scripts/env.sh)
. scripts/engine.sh  # ENGINE=sequential (default) or ray: unit, wait_units
MODEL=${MODEL:-smollm2_135M}
NUM_FOLD=${NUM_FOLD:-2}
if [ -n "${FULL:-}" ]; then
  OUT_DIR=${OUT_DIR:-validation}; subset=(); mode=full
  scored=(); [ -n "${MAX_QUESTIONS:-}" ] && scored=(--max_questions "$MAX_QUESTIONS") && mode="full data, first $MAX_QUESTIONS test questions per fold"
  KAPPAS=${KAPPAS:-"0 10 20 40 80"}; ALPHAS=${ALPHAS:-"0 2 5 10 15"}; SWEEP_Q=${SWEEP_Q:-}
else
  OUT_DIR=${OUT_DIR:-validation/quick}; subset=(--n_questions "${N_QUESTIONS:-300}")
  scored=(--max_questions "${MAX_QUESTIONS:-60}"); mode="quick: first ${N_QUESTIONS:-300} questions, ${MAX_QUESTIONS:-60} scored per fold"
  KAPPAS=${KAPPAS:-"0 10 20 40 80"}; ALPHAS=${ALPHAS:-"0 5 15"}; SWEEP_Q=${SWEEP_Q:-}
fi
# ITI's K unless NUM_HEADS says: chosen per model (slim.models.defaults: the paper's models 48 of 1,024 heads,
# others SmolLM2's 24 of 270 as a share of theirs)
NUM_HEADS=${NUM_HEADS:-$(python -m slim.models.defaults num_heads "$MODEL" "$@")}
common=(--num_fold "$NUM_FOLD" --out_dir "$OUT_DIR" "${subset[@]}")
# Figure 1 goes to paper/ only from the full run on a registry model (or to a PAPER_DIR asked for); other runs
# keep it under their OUT_DIR.
figures=(); [ -n "${FULL:-}" ] && [[ " $* " != *" --model_dir "* ]] && figures=(--paper_dir paper)
[ -n "${PAPER_DIR:-}" ] && figures=(--paper_dir "$PAPER_DIR")
PAPER_DIR=${PAPER_DIR:-paper}
outs=$(mktemp -d); trap 'rm -rf "$outs"' EXIT  # each run writes its summary path(s) in a file of its own here

bls=(); [ -n "${FIGURE_BLS:-}" ] && read -r -a bls <<< "$FIGURE_BLS" && bls=(--figure_bls "${bls[@]}")
unit "$MODEL stage 1" -- python choose_edited_layer.py "$MODEL" --dataset_name tqa_mc2 --bl 1.0 "${bls[@]}" \
  "${figures[@]}" "${common[@]}" "$@"
wait_units

sweep_q=(); [ -n "$SWEEP_Q" ] && sweep_q=(MAX_QUESTIONS="$SWEEP_Q")
env "${sweep_q[@]}" MODEL="$MODEL" KAPPAS="$KAPPAS" NUM_FOLD="$NUM_FOLD" OUT_DIR="$OUT_DIR" \
  bash sweep.sh "${subset[@]}" "$@"
env "${sweep_q[@]}" MODEL="$MODEL" METHOD=iti ALPHAS="$ALPHAS" NUM_HEADS="$NUM_HEADS" NUM_FOLD="$NUM_FOLD" \
  OUT_DIR="$OUT_DIR" bash sweep.sh "${subset[@]}" "$@"

# the unintervened model (alpha 0) and ITI at the chosen alpha: one process, one summary line each, in that order;
# SLIM and MiMiC likewise (under ENGINE=ray the two processes run at once)
unit "$MODEL test unintervened and ITI" -- python validate_2fold.py "$MODEL" --num_heads "$NUM_HEADS" --alpha 0 best \
  --use_center_of_mass "${common[@]}" "${scored[@]}" --summary_out "$outs/base_and_iti" "$@"
unit "$MODEL test SLIM and MiMiC" -- python ot_edit_layer.py "$MODEL" --bl 1.0 --alpha 0.1 --kappa best --mimic \
  --use_mode test "${common[@]}" "${scored[@]}" --summary_out "$outs/slim_and_mimic" "$@"
wait_units
mapfile -t rows < <(cat "$outs/base_and_iti" "$outs/slim_and_mimic")

settings=""
for v in FULL N_QUESTIONS MAX_QUESTIONS SWEEP_Q KAPPAS ALPHAS NUM_HEADS FIGURE_BLS; do
  [ -n "${!v:-}" ] && settings+="$v=\"${!v}\" "
done
cmd=$(printf '%q ' bash run_pipeline.sh "$@")
[ -n "${ROWS_OUT:-}" ] && printf '%s\n' "${rows[@]}" > "$ROWS_OUT"
python -m slim.evaluation.reports "${rows[@]}" --out "$PAPER_DIR/table1_${MODEL//\//_}_$([ -n "${FULL:-}" ] && echo full || echo quick).md" \
  --title "$MODEL, $NUM_FOLD folds, test questions ($mode; judges: ${JUDGES:-offline unless named})" \
  --command "${settings}${cmd% }"
