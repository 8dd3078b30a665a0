#!/usr/bin/env bash
# The paper's tables and figures on one model, by one command, into paper/ (offline by default).
#
#   bash reproduce.sh                 # quick: the first 300 questions, 60 scored per fold and method
#   FULL=1 bash reproduce.sh          # all 817 questions, every test question scored
#   MODEL=llama_7B FULL=1 bash reproduce.sh --device 0 --judge_name <ft-judge> --info_name <ft-info>
#   SLIM_NQ_FILE=NQ-open.dev.jsonl bash reproduce.sh   # transfer offline from a local NQ-open file (or NQ_FILE=...)
#   MODELS="smollm2_135M gemma3_270M" bash reproduce.sh  # each model's whole run in turn, then Table 1 across them
#
# Stages, each cached: a rerun after an interruption redoes nothing finished (answers, probes, maps and
# policies are read back; tables are written again from the summaries).
#   1. run_pipeline.sh: stage 1 and Figure 1 ((b): stage 1's probes trained again for each bl of FIGURE_BLS),
#      SLIM's kappa and ITI's alpha sweeps, their test runs and MiMiC's
#   2. Linear-AcT: its lambda swept on the validation questions like kappa, then its test run
#   3. Table 1 (all five rows), Figure 2 (the sweeps), Table 5 (examples by a seeded rule)
#   4. Table 2: the mixed arms (mixed_arms.py), each knob swept on the validation questions, then tested
#   5. Table 3: SLIM with probes trained by binary cross-entropy and by l2 instead of FPR+FNR
#   6. Table 4: running times (timings.py) on this machine's device
#   7. Transfer to NQ-open (transfer.py): NQ_FILE, else SLIM_NQ_FILE, the cache, then
#      online through `datasets`; otherwise a note
#   8. Table 1's judges against labels of the model's own answers where data/judge-labels/<model>_labels.csv
#      exists (slim.judges.check), the list of artefacts (paper/index_<model>_<mode>.md); with README=README.md
#      also the README's results section
# Tables 2 and 3 skip MC1/MC2 and CE/KL (the paper reports True*Info and True there).
# MODELS: `MODEL=<m> bash reproduce.sh` for each model in turn (the same files per model; a model whose run fails
# stops the command), then Table 1 across the models (paper/table1_models_<mode>.md), their index
# (paper/index_models_<mode>.md) and, with README, the README's section on every model.
# ITI's K (NUM_HEADS) defaults per model by the rule of slim.models.defaults (the paper's models 48, others
# SmolLM2's 24 of 270 heads as a share of theirs: Gemma 3 270M 6); the K and the rule go into the index.
#
# Environment: MODEL, MODELS, FULL, NUM_FOLD, N_QUESTIONS, MAX_QUESTIONS, SWEEP_Q, KAPPAS, ALPHAS, STRENGTHS,
# NUM_HEADS, FIGURE_BLS, OUT_DIR, PAPER_DIR (default paper), NQ_FILE, NQ_QUESTIONS, README, ENGINE. Extra arguments
# go to every Python command.
# ENGINE=ray (scripts/engine.sh; docs/scaling.md): the runs of a stage that do not need each other run as Ray tasks
# at once (the sweeps' values, the test runs of stages 1, 4 and 5, the transfer's answer sets), on this machine or
# a cluster (RAY_ADDRESS); Table 4's timings run alone. The models of MODELS still run in turn. The files written
# are the same.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/env.sh && slim_use_env  # the active environment, else .venv from install.sh (scripts/env.sh)
. scripts/engine.sh  # ENGINE=sequential (default) or ray: unit, wait_units
start=$(date +%s)
PAPER_DIR=${PAPER_DIR:-paper}
SETTINGS="FULL N_QUESTIONS MAX_QUESTIONS SWEEP_Q KAPPAS ALPHAS STRENGTHS NUM_HEADS FIGURE_BLS NQ_QUESTIONS"
settings=""  # the environment the command was given: the recorded command runs again as it is
[ -n "${MODEL:-}" ] && settings+="MODEL=\"$MODEL\" "
if [ -n "${MODELS:-}" ]; then  # several models: each one's whole run in turn, timed, then Table 1 across them
  read -r -a models <<< "$MODELS"
  mode=quick; [ -n "${FULL:-}" ] && mode=full
  for v in $SETTINGS; do [ -n "${!v:-}" ] && settings+="$v=\"${!v}\" "; done
  cmd=$(printf '%q ' bash reproduce.sh "$@"); cmd="MODELS=\"$MODELS\" ${settings}${cmd% }"
  for m in "${models[@]}"; do
    t0=$(date +%s)
    echo; echo "=== reproduce.sh ($mode): model $m ==="
    if ! env -u MODELS -u README MODEL="$m" bash reproduce.sh "$@"; then
      echo "error: reproduce.sh stopped at model $m, whose run failed (above); the models before it are finished" \
        "and a rerun reads back what every run finished." >&2
      exit 1
    fi
    echo "=== reproduce.sh ($mode): model $m done in $(( $(date +%s) - t0 )) s ==="
  done
  readme=(); [ -n "${README:-}" ] && readme=(--readme "$README")
  python -m slim.paper --paper_dir "$PAPER_DIR" --models "${models[@]//\//_}" --mode "$mode" --command "$cmd" \
    --seconds "$(( $(date +%s) - start ))" "${readme[@]}"
  exit 0
fi
MODEL=${MODEL:-smollm2_135M}
NUM_FOLD=${NUM_FOLD:-2}
if [ -n "${NUM_HEADS:-}" ]; then
  heads_rule=NUM_HEADS  # set by the caller
else  # ITI's K chosen for the model (slim.models.defaults), printed as "K rule"
  chosen=$(python -m slim.models.defaults num_heads "$MODEL" --with_rule "$@")
  read -r NUM_HEADS heads_rule <<< "$chosen"
fi
name=${MODEL//\//_}
if [ -n "${FULL:-}" ]; then
  mode=full; OUT_DIR=${OUT_DIR:-validation}; subset=()
  scored=(); [ -n "${MAX_QUESTIONS:-}" ] && scored=(--max_questions "$MAX_QUESTIONS")
  ALPHAS=${ALPHAS:-"0 2 5 10 15"}; NQ_QUESTIONS=${NQ_QUESTIONS:-}; FIGURE_BLS=${FIGURE_BLS:-"0.6 0.8 1.0 1.2 1.4 2.0"}
else
  mode=quick; OUT_DIR=${OUT_DIR:-validation/quick}; subset=(--n_questions "${N_QUESTIONS:-300}")
  scored=(--max_questions "${MAX_QUESTIONS:-60}")
  ALPHAS=${ALPHAS:-"0 5 15"}; NQ_QUESTIONS=${NQ_QUESTIONS:-100}; FIGURE_BLS=${FIGURE_BLS:-"0.6 1.0 2.0"}
fi
KAPPAS=${KAPPAS:-"0 10 20 40 80"}
STRENGTHS=${STRENGTHS:-"0 0.25 0.5 0.75 1"}
export MODEL NUM_FOLD NUM_HEADS OUT_DIR PAPER_DIR KAPPAS ALPHAS FIGURE_BLS
sweep_env=(); [ -n "${SWEEP_Q:-}" ] && sweep_env=(MAX_QUESTIONS="$SWEEP_Q")
common=(--num_fold "$NUM_FOLD" --out_dir "$OUT_DIR" "${subset[@]}")
light=(--no_mc --no_ce_kl)
mkdir -p "$PAPER_DIR"
for v in $SETTINGS; do [ -n "${!v:-}" ] && settings+="$v=\"${!v}\" "; done
cmd=$(printf '%q ' bash reproduce.sh "$@"); cmd="${settings}${cmd% }"
judges="judges: ${JUDGES:-offline unless named}"
# each stage's seconds, a line per invocation (slim.paper.stage_times): a resumed run's cost is their sum
ledger="$OUT_DIR/stage_seconds_${name}.tsv"; invocation=$(date +%s); stage_now=""; stage_t0=0
close_stage() {  # close_stage complete|interrupted: the running stage's line into the ledger
  [ -n "$stage_now" ] || return 0
  mkdir -p "$OUT_DIR"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$invocation" "$(date -u +%FT%TZ)" "${stage_now%% *}" "${stage_now#* }" \
    "$(( $(date +%s) - stage_t0 ))" "$1" "$cmd" >> "$ledger"
  stage_now=""
}
stage() { close_stage complete; stage_now=$*; stage_t0=$(date +%s); echo; echo "=== reproduce.sh ($mode): $* ==="; }
outs=$(mktemp -d); rows_file=$(mktemp)  # a summary list per run
finish() { local rc=$?; if [ "$rc" = 0 ]; then close_stage complete; else close_stage interrupted; fi
  rm -rf "$outs" "$rows_file"; }
trap finish EXIT
trap 'exit 130' INT TERM  # a stopped run still writes its stage's line (finish)
last() { head -n 1 "$outs/$1"; }  # last <run>: the summary its run wrote
report() {  # report <out.md> <title> <summary>... [--labels <label>...]
  local out=$1 title=$2; shift 2
  python -m slim.evaluation.reports "$@" --out "$out" --title "$title" --command "$cmd" > /dev/null
  echo "written $out"
}

stage "1/8 the pipeline: stage 1, Figure 1, the sweeps, Table 1's first four rows"
ROWS_OUT="$rows_file" bash run_pipeline.sh "$@"
mapfile -t rows < "$rows_file"  # unintervened, ITI, SLIM, MiMiC test summaries
base_row=${rows[0]}; iti_row=${rows[1]}; slim_row=${rows[2]}
# the run's tag (model folder and question subset): Figure 1's files and the sweeps' choices are named by it
run_tag=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))[-1]["run"])' "$base_row")

stage "2/8 Linear-AcT: lambda on the validation questions, then the test questions"
env "${sweep_env[@]}" METHOD=linear_act STRENGTHS="$STRENGTHS" bash sweep.sh "${subset[@]}" "$@"
unit "$MODEL test Linear-AcT" -- python linear_act.py "$MODEL" --strength best "${common[@]}" "${scored[@]}" \
  --summary_out "$outs/linear_act" "$@"
wait_units
linear_act_row=$(last linear_act)

stage "3/8 Table 1, Figure 2, Table 5"
report "$PAPER_DIR/table1_${name}_${mode}.md" "Table 1: $MODEL, $NUM_FOLD folds, test questions ($mode; $judges)" \
  "${rows[@]}" "$linear_act_row"
for method in slim iti linear_act; do
  python -m slim.paper.figures sweep --best "$OUT_DIR/${run_tag}_best_$method.json" \
    --out "$PAPER_DIR/figure2_${name}_${mode}_$method.png" > /dev/null
  echo "written $PAPER_DIR/figure2_${name}_${mode}_$method.png"
done
python -m slim.paper.examples "$base_row" "$iti_row" "$slim_row" --out "$PAPER_DIR/table5_${name}_${mode}.md" > /dev/null
echo "written $PAPER_DIR/table5_${name}_${mode}.md"

stage "4/8 Table 2: the mixed arms"
env "${sweep_env[@]}" METHOD=slim_on_iti_heads bash sweep.sh "${subset[@]}" "${light[@]}" "$@"
env "${sweep_env[@]}" METHOD=iti_on_slim_layer bash sweep.sh "${subset[@]}" "${light[@]}" "$@"
unit "$MODEL test SLIM on ITI's heads" -- python mixed_arms.py "$MODEL" --arm slim_on_iti_heads --kappa best \
  --num_heads "$NUM_HEADS" --use_center_of_mass "${common[@]}" "${scored[@]}" "${light[@]}" \
  --summary_out "$outs/slim_on_iti" "$@"
unit "$MODEL test ITI on SLIM's layer" -- python mixed_arms.py "$MODEL" --arm iti_on_slim_layer --alpha best \
  --use_center_of_mass "${common[@]}" "${scored[@]}" "${light[@]}" --summary_out "$outs/iti_on_slim" "$@"
wait_units
slim_on_iti_row=$(last slim_on_iti)
iti_on_slim_row=$(last iti_on_slim)
report "$PAPER_DIR/table2_${name}_${mode}.md" "Table 2: head selection vs intervention, $MODEL ($mode; $judges)" \
  "$base_row" "$iti_row" "$slim_row" "$slim_on_iti_row" "$iti_on_slim_row" --labels unintervened ITI SLIM \
  "ITI's heads + SLIM's maps" "SLIM's layer + ITI's shifts"
# Table 1's and Table 2's runs each paired against ITI's answers to the same questions: where SLIM is ahead of ITI
report "$PAPER_DIR/versus_iti_${name}_${mode}.md" "Against ITI: $MODEL ($mode; $judges)" "$iti_row" "$base_row" \
  "$slim_row" "${rows[3]}" "$linear_act_row" "$slim_on_iti_row" "$iti_on_slim_row" --paired_against "$iti_row" \
  --labels ITI unintervened SLIM MiMiC Linear-AcT "ITI's heads + SLIM's maps" "SLIM's layer + ITI's shifts"

stage "5/8 Table 3: the probes' loss"
for loss in cross_entropy l2; do
  unit "$MODEL test SLIM with the $loss loss" -- python ot_edit_layer.py "$MODEL" --bl 1.0 --alpha 0.1 --kappa best \
    --loss_type "$loss" --use_mode test "${common[@]}" "${scored[@]}" "${light[@]}" --summary_out "$outs/$loss" "$@"
done
wait_units
loss_rows=("$(last cross_entropy)" "$(last l2)")
report "$PAPER_DIR/table3_${name}_${mode}.md" "Table 3: SLIM's probe loss, $MODEL ($mode; $judges)" \
  "$base_row" "$slim_row" "${loss_rows[@]}" --labels unintervened "FPR+FNR (paper)" "binary cross-entropy" "l2"

stage "6/8 Table 4: running time"
# a task alone in its wave under ENGINE=ray, so that nothing else runs beside what it times (on its node)
unit "$MODEL Table 4" -- python timings.py "$MODEL" --kappa best "${common[@]}" \
  --out "$PAPER_DIR/table4_${name}_${mode}.md" "$@"
wait_units

stage "7/8 transfer to NQ-open"
nq=(); [ -n "${NQ_FILE:-}" ] && nq=(--nq_file "$NQ_FILE")
[ -n "$NQ_QUESTIONS" ] && nq+=(--max_questions "$NQ_QUESTIONS")
transfer=(python transfer.py "$iti_row" "$slim_row" "$linear_act_row" "${nq[@]}")
# the answer sets (the unintervened model's, each fold's policy's) need nothing of one another: under ray a unit
# each, then the report reads them back and scores them; run in turn, the report answers them all with one model load
if [ "$_ENGINE_MODE" = ray ]; then
  answer_sets=$("${transfer[@]}" --list_answer_sets "$@")
  for answers in $answer_sets; do
    unit "$MODEL transfer answers $answers" -- "${transfer[@]}" --answer_set "$answers" "$@"
  done
  wait_units
fi
unit "$MODEL transfer" -- "${transfer[@]}" --out "$PAPER_DIR/transfer_${name}_${mode}.md" "$@"
wait_units

stage "8/8 the artefacts"
# Table 1's judges against labels of this model's own answers, where the project has them
labels="data/judge-labels/${name}_labels.csv"
if [ -f "$labels" ] && ! python -m slim.judges.check "${rows[@]}" "$linear_act_row" --labels "$labels" \
    --out "$PAPER_DIR/judge_check_${name}_${mode}.md" --title "Table 1's judges against $labels ($MODEL, $mode)"; then
  echo "note: no judge check for $MODEL (the line above says why); the run's other artefacts are unaffected." >&2
fi
readme=(); [ -n "${README:-}" ] && readme=(--readme "$README")
python -m slim.paper --paper_dir "$PAPER_DIR" --model "$name" --mode "$mode" --run_tag "$run_tag" --command "$cmd" \
  --seconds "$(( $(date +%s) - start ))" --summaries "${rows[@]}" "$linear_act_row" \
  --num_heads "$NUM_HEADS" --num_heads_rule "$heads_rule" --stage_ledger "$ledger" "${readme[@]}"
