#!/usr/bin/env bash
# The main job on the local defaults, from a fresh clone to a served model: start a local Ray
# head and MLflow server, synthesise a dehazing dataset of scenes composed from real photos
# (builtin-scenes: depth known by construction), train HDM on it with Ray Train (2 CPU workers)
# tracked in MLflow, register it as champion, serve it with Ray Serve, and compare it over HTTP
# with the hazy input and the classic DCP dehazer. Re-running reuses what is done (running
# services, an unchanged dataset, a finished training run).
#
# Sizes and ports can be changed through the environment (the tests run it small):
#   QUICKSTART_PAIRS (2000), QUICKSTART_EPOCHS (the config's), QUICKSTART_RUN (quickstart),
#   HDM_HOME (./.hdm), and the ports of `hdm local up --help` (HDM_RAY_PORT 6379,
#   HDM_DASHBOARD_PORT 8265, HDM_MLFLOW_PORT 5000, HDM_SERVE_PORT 8000, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

export HDM_HOME=${HDM_HOME:-$PWD/.hdm}
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}  # one progress line per epoch instead
config=jobs/configs/quickstart-cpu.yaml
dataset=$HDM_HOME/datasets/quickstart-dehaze
out=$HDM_HOME/quickstart
run_name=${QUICKSTART_RUN:-quickstart}
pairs=${QUICKSTART_PAIRS:-2000}
hdm=.venv/bin/hdm

current_step=setup
trap 'status=$?; if [ $status -ne 0 ]; then
  echo; echo "quickstart: step \"$current_step\" failed (exit $status); the error is above."
  echo "Fix it and re-run: bash scripts/quickstart.sh (finished steps are reused)."
fi' EXIT
step() { current_step=$2; echo; echo "==> [$1/7] $2"; }

step 1 "setting up .venv"
bash scripts/setup.sh
mkdir -p "$out"

step 2 "starting a local Ray head and MLflow server (reused when running)"
$hdm local up   # ports: HDM_RAY_PORT, HDM_DASHBOARD_PORT, HDM_MLFLOW_PORT, HDM_SERVE_PORT, ... (hdm local up --help)
eval "$($hdm local env)"

step 3 "synthesising a dehazing dataset of dead-leaves scenes of real photos -> $dataset"
$hdm data synth --task dehaze --count "$pairs" --size 96 --val-fraction 0.05 --test-fraction 0.05 \
  --seed 0 --no-progress builtin-scenes "$dataset"
$hdm data inspect "$dataset" --contact-sheet "$out/dataset.png"

step 4 "training HDM with Ray Train (2 CPU workers) on the Ray head, tracked in MLflow"
epochs=()
[ -n "${QUICKSTART_EPOCHS:-}" ] && epochs=(--set "train.epochs=$QUICKSTART_EPOCHS")
$hdm train --config "$config" --set data.uri="$dataset" --set run.name="$run_name" "${epochs[@]}" \
  | tee "$out/train.txt"
version=$(sed -n 's/^registered version: *[^ ]* v\([0-9]*\)$/\1/p' "$out/train.txt")
[ -n "$version" ] || { echo "training registered no model version"; exit 1; }
$hdm model promote dehaze "$version" --alias champion

step 5 "serving models:/hdm-dehaze@champion with Ray Serve (serve_configs/local.yaml)"
$hdm serve up serve_configs/local.yaml --set http_options.port="$HDM_SERVE_PORT"
served=http://127.0.0.1:$HDM_SERVE_PORT/v1/enhance/dehaze

step 6 "over HTTP: the held-out images, and the model against the hazy input and classic DCP"
$hdm data export "$dataset" --split test --side input -o "$out/hazy"
$hdm enhance "$out/hazy" -o "$out/enhanced" --checkpoint "$served"
$hdm compare --model "hdm=$served" --model "hazy input=input" --model "DCP=dcp" \
  --data "$dataset" --split test --table "$out/comparison.md" --picture "$out/before-after.png" \
  | tee "$out/comparison.txt"
first=$(ls "$out/hazy" | head -n 1)
$hdm explain "$out/hazy/$first" -o "$out/regions.png" --checkpoint models:/hdm-dehaze@champion

step 7 "done"
cat <<EOF
Web page (upload, before/after):  http://127.0.0.1:$HDM_SERVE_PORT/   (API docs: /docs)
MLflow UI (runs, registry):       $MLFLOW_TRACKING_URI
Ray dashboard:                    $RAY_DASHBOARD_ADDRESS
Dataset:            $dataset  (contact sheet: $out/dataset.png)
Training run:       $HDM_HOME/runs/$run_name
Registered model:   models:/hdm-dehaze@champion (version $version), served at $served
Comparison:         $out/comparison.md   (before/after picture: $out/before-after.png)
Enhanced over HTTP: $out/enhanced   (inputs in $out/hazy, region masks: $out/regions.png)
Use the services from a shell:  eval "\$(HDM_HOME=$HDM_HOME .venv/bin/hdm local env)"
Stop everything:                HDM_HOME=$HDM_HOME .venv/bin/hdm local down
Start over:                     stop, then delete $HDM_HOME
EOF
