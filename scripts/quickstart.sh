#!/usr/bin/env bash
# The main job on the local defaults: synthesise a dehazing dataset from real photos, train
# HDM on it with Ray Train (2 CPU workers) tracked in MLflow, register it as champion,
# evaluate it against the hazy input and the classic DCP dehazer, and enhance the held-out
# images. Re-running reuses what is done (the dataset is a no-op when unchanged, training
# resumes its run by name).
set -euo pipefail
cd "$(dirname "$0")/.."

export HDM_HOME=${HDM_HOME:-$PWD/.hdm}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$HDM_HOME/mlflow.db}
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}  # one progress line per epoch instead
config=jobs/configs/quickstart-cpu.yaml
dataset=$HDM_HOME/datasets/quickstart-dehaze
out=$HDM_HOME/quickstart
run_name=${QUICKSTART_RUN:-quickstart}
hdm=.venv/bin/hdm

current_step=setup
trap 'status=$?; if [ $status -ne 0 ]; then
  echo; echo "quickstart: step \"$current_step\" failed (exit $status); the error is above."
  echo "Fix it and re-run: bash scripts/quickstart.sh (finished steps are reused)."
fi' EXIT
step() { current_step=$2; echo; echo "==> [$1/6] $2"; }

step 1 "setting up .venv"
bash scripts/setup.sh
mkdir -p "$out"

step 2 "synthesising a dehazing dataset from scikit-image's real photos -> $dataset"
$hdm data synth --task dehaze --count 320 --size 96 --val-fraction 0.05 --test-fraction 0.05 \
  --seed 0 --no-progress builtin "$dataset"
$hdm data inspect "$dataset" --contact-sheet "$out/dataset.png"

step 3 "training HDM with Ray Train (2 CPU workers), tracked in MLflow"
$hdm train --config "$config" --set data.uri="$dataset" --set run.name="$run_name" | tee "$out/train.txt"
version=$(sed -n 's/^registered version: *[^ ]* v\([0-9]*\)$/\1/p' "$out/train.txt")
[ -n "$version" ] || { echo "training registered no model version"; exit 1; }
$hdm models promote dehaze "$version" --alias champion

step 4 "evaluating on the held-out split: the model, the hazy input, classic DCP"
model=models:/hdm-dehaze@champion
for candidate in "$model" input dcp; do
  name=${candidate##*/}
  $hdm evaluate --model "$candidate" --data "$dataset" --split test --no-mlflow \
    --out "$out/eval-${name//@/-}.csv" | tail -n 1 | sed "s|^|$candidate: |"
done | tee "$out/comparison.txt"

step 5 "enhancing the held-out images with $model"
$hdm data export "$dataset" --split test --side input -o "$out/hazy"
$hdm enhance "$out/hazy" -o "$out/enhanced" --checkpoint "$model"
first=$(ls "$out/hazy" | head -n 1)
$hdm explain "$out/hazy/$first" -o "$out/regions.png" --checkpoint "$model"

step 6 "done"
cat <<EOF
Dataset:            $dataset  (contact sheet: $out/dataset.png)
Training run:       $HDM_HOME/runs/$run_name
MLflow:             $MLFLOW_TRACKING_URI   (UI: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI)
Registered model:   $model (version $version)
Comparison (PSNR/SSIM on the test split): $out/comparison.txt
Enhanced images:    $out/enhanced   (inputs in $out/hazy, region masks: $out/regions.png)
Everything lives under $HDM_HOME; delete it to start over.
EOF
