#!/bin/bash
# Every report in docs/results/properties, on the models of the small reproduction
# (`cascadenet reproduce --dataset fashion-mnist --seeds 3 --budget small --out runs/reproduce`).
# Usage: docs/results/properties/run.sh [early-exit|typicality|policy|noise|ews70|ood|summary]... (default: all)
# ood needs the handwritten digits in MNIST format: see digits_to_idx.py (DIGITS=folder, default /tmp/digits-idx).
# The run names carry the option the reproduction tuned (cascaded-td-lam0.5-s0, ce-lr0.05-s0, sdn-lr0.1-s0, ...):
# they are read from the reproduction's report (REPORT, its tuning table's chosen values), not typed here.
# Environment: R (the reproduction's runs/), O (output folder), C (the cascadenet command), PY (python), THREADS.
set -euo pipefail
R=${R:-runs/reproduce/fashion-mnist-small/runs}
REPORT=${REPORT:-$R/../fashion-mnist.json}
O=${O:-docs/results/properties}
C=${C:-.venv/bin/cascadenet}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
DIGITS=${DIGITS:-/tmp/digits-idx}
# the run name of a reproduction row at its chosen configuration, e.g. cascaded-td -> cascaded-td-lam0.5
chosen() {
  $PY -c 'import json, sys
t = json.load(open(sys.argv[1]))["tuning"][sys.argv[2]]
print("%s-%s%g" % (sys.argv[2], t["option"], t["chosen"]))' "$REPORT" "$1"
}
TD=$(chosen cascaded-td) CE=$(chosen ce) SDN=$(chosen sdn) MSD=$(chosen msdnet)
LAM=${TD#cascaded-td-lam}  # the lambda the footwear-free CascadedTD is trained with
SECTIONS=${*:-early-exit typicality policy noise ews70 ood summary}
for section in $SECTIONS; do
  case $section in
  early-exit)  # wall clock: run on an idle machine; the operating point is chosen on the validation split
    for s in 0 1 2; do
      $PY benchmarks/early_exit.py --run-dir $R/$TD-s$s --threads $THREADS --repeats 5 --json $O/early_exit-s$s.json \
        > $O/early_exit-s$s.txt 2>&1
    done ;;
  typicality)  # CascadedTD, CascadedCE and SDN on the same validation examples, per seed (4 folds x 8 repeats)
    for s in 0 1 2; do
      $C typicality $R/$TD-s$s $R/$CE-s$s $R/$SDN-s$s --out $O/typicality-s$s --threads $THREADS --overwrite
    done ;;
  policy)
    $C policy $R/$TD-s0 $R/$TD-s1 $R/$TD-s2 $R/$CE-s0 $R/$SDN-s0 $R/$MSD-s0 --out $O/policy --threads $THREADS \
      --overwrite ;;
  noise)  # every protocol, the trajectory as long as the transient and the burst need
    for s in 0 1 2; do
      for run in $TD $CE; do
        m=$([ $run = $TD ] && echo td || echo ce)
        $C noise $R/$run-s$s --sigmas 0.1 0.2 0.4 --max-examples 2000 --seed $s --out $O/noise-$m-s$s \
          --threads $THREADS --overwrite
      done
    done ;;
  ews70)  # persistent noise over the reference code's 70 steps (EWS alpha 0.9), EWS with its own statistics
    for s in 0 1 2; do
      for run in $TD $CE; do
        m=$([ $run = $TD ] && echo td || echo ce)
        $C noise $R/$run-s$s --protocols persistent --sigmas 0.1 0.2 0.4 --num-steps 70 --max-examples 2000 \
          --seed $s --out $O/ews70-$m-s$s --threads $THREADS --overwrite
      done
    done
    # the reference code's test-time swap (the trained statistics), for contrast
    $C noise $R/$TD-s0 --protocols persistent --sigmas 0.1 0.2 0.4 --num-steps 70 --max-examples 2000 \
      --ews-recalibrate-batches 0 --out $O/ews70-trained-stats-td-s0 --threads $THREADS --overwrite ;;
  ood)  # every report has MSP, the trace scores, energy, and the learned detector with its last-exit-only ablation
    for s in 0 1 2; do
      # a CascadedTD without footwear (5 sandal, 7 sneaker, 9 ankle boot), the reproduction's small recipe
      [ -f runs/props/td-no-footwear-s$s/model.safetensors ] || $C train --model resnet10 --width 8 --stem cifar_pool \
        --epochs 3 --max-batches 150 --warmup-epochs 0.5 --lam $LAM --holdout-classes 5 7 9 --seed $s \
        --out runs/props --name td-no-footwear-s$s --threads $THREADS
      $C ood runs/props/td-no-footwear-s$s --out $O/ood-heldout-footwear-s$s --threads $THREADS --overwrite
      $C ood $R/$TD-s$s --synthetic-ood --ood-dataset mnist --ood-data $DIGITS --out $O/ood-td-s$s \
        --threads $THREADS --overwrite
    done ;;
  summary)
    $PY $O/summary.py $O ;;
  *) echo "unknown section $section" >&2; exit 2 ;;
  esac
done
