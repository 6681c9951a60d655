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

# stage_run CONFIG RUN_DIR [ARGS...]: one stage run of CONFIG into RUN_DIR for $seed, skipped once it has
# a summary and resumed when it saved state; RUN_DIR joins the `runs` array either way
stage_run() {
  local config="$1" run="$2"; shift 2
  [ -f "$run/summary.json" ] || "$PY" run.py --config "$config" --quiet --set seed="$seed" \
      --set run_dir="$run" $(resume "$run") "$@"
  runs+=("$run")
}
