# Sourced by the experiment scripts; expects PY (the Python to run).

# the parameter groups a stage 2 or 3 loads from its stage 1
BACKBONE="[item_embedding, position_embedding, trm_encoder, LayerNorm]"

# baseline_done RUN_DIR EPOCHS: its summary says it spent its epochs or stopped on patience
# (one stopped by its time limit goes on when its command is run again).
baseline_done() {
  [ -f "$1/summary.json" ] && "$PY" -c 'import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(not (s.get("stopped_by") == "patience" or s["epochs_run"] >= int(sys.argv[2])))' "$1/summary.json" "$2"
}

# resume RUN_DIR: the flag that continues a run that saved state, or replaces one stopped before its
# first save (only its own files)
resume() { if [ -f "$1/state.pt" ]; then echo --resume "$1"; else echo --overwrite; fi; }

# compare_record STEM RUN_A RUN_B [ARGS...]: `run.py compare` of the two runs, its record STEM.json and
# the table it printed, STEM.md (the pair the pages quote and tests/test_published_tables.py checks)
compare_record() {
  local stem="$1"; shift
  "$PY" run.py compare "$@" --json "$stem.json" > "$stem.md"
}

# results_record STEM RUN_DIR...: `run.py results` of the runs, its record STEM.json and its table STEM.md
results_record() {
  local stem="$1"; shift
  "$PY" run.py results "$@" --out "$stem.json" > "$stem.md"
}

# stage_run CONFIG RUN_DIR [ARGS...]: one stage run of CONFIG into RUN_DIR for $seed, skipped once it has
# a summary and resumed when it saved state; RUN_DIR joins the `runs` array either way
stage_run() {
  local config="$1" run="$2"; shift 2
  [ -f "$run/summary.json" ] || "$PY" run.py --config "$config" --quiet --set seed="$seed" \
      --set run_dir="$run" $(resume "$run") "$@"
  runs+=("$run")
}

# The seed-2020 ML-1M runs that docs/PRIVACY.md and docs/TUNING.md measure: the full-softmax stage 1
# (experiments/ml1m.sh's stage1_ce) into $ML1M_STAGE1, and a stage 2 on it at the stability sweep's best
# point (trial a22e3_00002) into $ML1M_STAGE2_BEST. Each skipped once finished, resumed if interrupted.
ML1M_STAGE1=runs/ml1m/seed2020/stage1_ce
ML1M_STAGE2_BEST=runs/ml1m/seed2020/stage2_a22e3_00002
ml1m_sweep_runs() {
  local seed=2020
  stage_run yamls/ml1m/stage1_earlier.yaml $ML1M_STAGE1 --set loss.type=ce --set name=ml1m-stage1-ce
  stage_run yamls/ml1m/tune_stage2.yaml $ML1M_STAGE2_BEST --set name=ml1m-stage2-a22e3_00002 \
    --set federated.server_lr=0.0010011373065720282 --set model.projector_init_gain=3.362439397175419 \
    --set "load=[{checkpoint: $ML1M_STAGE1/best.pt, groups: $BACKBONE}]"
}
