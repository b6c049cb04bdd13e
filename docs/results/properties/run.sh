#!/bin/bash
# Every report in docs/results/properties, on the models of the small reproduction
# (`cascadenet reproduce --dataset fashion-mnist --seeds 3 --budget small --out runs/reproduce`).
# Usage: docs/results/properties/run.sh [early-exit|typicality|policy|noise|ews70|ood|summary]... (default: all)
# ood needs the handwritten digits in MNIST format: see digits_to_idx.py (DIGITS=folder, default /tmp/digits-idx).
# The run names are those of the reproduction before issue 17 (ce-sS, sdn-sS, msdnet-sS). Since issue 17 the
# reproduction names runs by their tuned option (ce-lr0.05-sS, sdn-lr0.1-sS, msdnet-lr0.1-sS: see the tuning table
# of its report); the *-issue17-* reports were made on those runs with the commands in docs/results/README.md.
set -euo pipefail
R=${R:-runs/reproduce/fashion-mnist-small/runs}
O=${O:-docs/results/properties}
C=${C:-.venv/bin/cascadenet}
DIGITS=${DIGITS:-/tmp/digits-idx}
TD=cascaded-td-lam0.5  # lambda chosen by the reproduction (validation AUC)
SECTIONS=${*:-early-exit typicality policy noise ews70 ood summary}
for section in $SECTIONS; do
  case $section in
  early-exit)  # wall clock: run on an idle machine
    .venv/bin/python benchmarks/early_exit.py --run-dir $R/$TD-s0 --threads 2 --repeats 5 --json $O/early_exit.json \
      > $O/early_exit.txt 2>&1 ;;
  typicality)  # CascadedTD, CascadedCE and SDN on the same validation examples, per seed
    for s in 0 1 2; do $C typicality $R/$TD-s$s $R/ce-s$s $R/sdn-s$s --out $O/typicality-s$s --overwrite; done ;;
  policy)
    $C policy $R/$TD-s0 $R/$TD-s1 $R/$TD-s2 $R/ce-s0 $R/sdn-s0 $R/msdnet-s0 --out $O/policy --overwrite ;;
  noise)  # every protocol, the trajectory as long as the transient and the burst need
    for s in 0 1 2; do
      $C noise $R/$TD-s$s --sigmas 0.1 0.2 0.4 --max-examples 2000 --seed $s --out $O/noise-td-s$s --overwrite
      $C noise $R/ce-s$s --sigmas 0.1 0.2 0.4 --max-examples 2000 --seed $s --out $O/noise-ce-s$s --overwrite
    done ;;
  ews70)  # persistent noise over the reference code's 70 steps (EWS alpha 0.9), EWS with its own statistics
    for s in 0 1 2; do
      for m in td ce; do
        run=$([ $m = td ] && echo $TD || echo ce)
        $C noise $R/$run-s$s --protocols persistent --sigmas 0.1 0.2 0.4 --num-steps 70 --max-examples 2000 \
          --seed $s --out $O/ews70-$m-s$s --overwrite
      done
    done
    # the reference code's test-time swap (the trained statistics), for contrast
    $C noise $R/$TD-s0 --protocols persistent --sigmas 0.1 0.2 0.4 --num-steps 70 --max-examples 2000 \
      --ews-recalibrate-batches 0 --out $O/ews70-trained-stats-td-s0 --overwrite ;;
  ood)
    for s in 0 1 2; do
      # a CascadedTD without footwear (5 sandal, 7 sneaker, 9 ankle boot), the reproduction's small recipe
      [ -f runs/props/td-no-footwear-s$s/model.safetensors ] || $C train --model resnet10 --width 8 --stem cifar_pool \
        --epochs 3 --max-batches 150 --warmup-epochs 0.5 --lam 0.5 --holdout-classes 5 7 9 --seed $s \
        --out runs/props --name td-no-footwear-s$s --threads 2
      $C ood runs/props/td-no-footwear-s$s --out $O/ood-heldout-footwear-s$s --overwrite
      $C ood $R/$TD-s$s --synthetic-ood --ood-dataset mnist --ood-data $DIGITS --out $O/ood-td-s$s --overwrite
    done ;;
  summary)
    .venv/bin/python $O/summary.py $O ;;
  *) echo "unknown section $section" >&2; exit 2 ;;
  esac
done
