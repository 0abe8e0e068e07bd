#!/usr/bin/env bash
# The runs behind docs/ONPOLICY.md (Tajwar et al. 2024, arXiv 2404.14367, with BPO alongside):
# the didactic bandit (R1 and R2, 5 seeds), its two knobs (sample reuse T and data per iteration
# B, 3 seeds) and the length tasks (3 seeds), two runs at a time, then one report per root.
#   bash scripts/onpolicy_study.sh          # ~80 min on 2 CPU cores
set -euo pipefail
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
jobs=$(mktemp)

for seed in 0 1 2 3 4; do
  for spec in "on_policy ipo" "on_policy dpo" "on_policy ipo --bpo" "on_policy ppo" \
              "on_policy rwr" "on_policy best_of_n" "on_policy best_of_n_negative" \
              "offline ipo" "offline dpo" "offline best_of_n" "on_policy reinforce" \
              "offline pref_ft"; do
    set -- $spec
    echo "bandit --reward r1 --data $1 --method $2 ${3:-} seed=$seed" >> "$jobs"
  done
done
for seed in 0 1 2 3 4; do
  for spec in "on_policy ipo" "on_policy dpo" "on_policy ipo --bpo" "on_policy ppo" \
              "on_policy rwr" "offline ipo" "offline dpo"; do
    set -- $spec
    echo "bandit --reward r2 --data $1 --method $2 ${3:-} seed=$seed" >> "$jobs"
  done
done
for seed in 0 1 2; do  # the knobs at 200 gradient steps: reuse T, then B at a fixed minibatch
  for spec in "dpo" "ipo" "ipo --bpo"; do
    set -- $spec
    tag=$([ -n "${2:-}" ] && echo "bpo_$1" || echo "$1")
    for T in 1 10 50; do
      echo "bandit --reward r1 --method $spec --out runs/bandit_knobs/T/r1/on_policy-${tag}_T$T/seed$seed seed=$seed reuse=$T iterations=$((200 / T)) eval_every=$(( T < 20 ? 20 / T : 1 )) minibatch=10 B=10" >> "$jobs"
    done
    for B in 5 10 40; do
      echo "bandit --reward r1 --method $spec --out runs/bandit_knobs/B/r1/on_policy-${tag}_B$B/seed$seed seed=$seed B=$B minibatch=5 reuse=10 iterations=20 eval_every=2" >> "$jobs"
    done
  done
done
for seed in 0 1 2; do
  for task in min_length skew_length mode_length; do
    for spec in "offline dpo sft" "on_policy dpo sft" "on_policy ipo sft" \
                "on_policy dpo behavior" "on_policy rwr sft"; do
      set -- $spec
      tag=$([ "$3" = behavior ] && echo "bpo_$2" || echo "$2")
      extra=$([ "$2" = rwr ] && echo "beta=1.0" || ([ "$2" = ipo ] && echo "beta=0.5") || true)
      echo "study configs/onpolicy/length.yaml task=$task method=$2 data=$1 reference=$3 seed=$seed $extra output_dir=runs/onpolicy/$task/$1-$tag/seed$seed" >> "$jobs"
    done
    echo "study configs/onpolicy/length.yaml task=$task method=ipo seed=$seed beta=0.05 output_dir=runs/onpolicy/$task/on_policy-ipo_beta0.05/seed$seed" >> "$jobs"
  done
done

if [ ! -d runs/digest_demo/sft/model ]; then  # the length tasks start from the demo's SFT model
  python -c "from bpo.demo import run_demo; run_demo('runs/digest_demo', methods=(), progress=False)"
fi
xargs -P 2 -I{} sh -c 'bpo {} > /dev/null' < "$jobs"
for root in runs/bandit runs/bandit_knobs/T runs/bandit_knobs/B runs/onpolicy; do
  bpo study-report "$root" > /dev/null
done
