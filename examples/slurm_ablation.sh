#!/usr/bin/env bash
# An ablation as a SLURM job array: one fine-tune per setting x seed (examples/slurm_finetune.sbatch,
# one array task each, output in RUNS/NAME.seedS/, job logs in RUNS/slurm-*.out), then tools/compare_runs.py as a job that
# starts only when every task has succeeded (--dependency=afterok). Run from the repository root;
# both are submitted with the cluster settings (examples/cluster/settings.env) as sbatch options;
# arguments are more sbatch options for the array (--nodes, --time, ...).
#   ABLATION="none:0 uniform:5 gaussian:5 bernoulli:5 symmetric:5:concat symmetric:5:microbatch" SEEDS="1 2 3" \
#       PRESET=llama2-7b DATASET=alpaca CKPT=ckpt/llama2-7b DATA=data/alpaca RUNS=runs/ablation \
#       bash examples/slurm_ablation.sh
# A setting is KIND:ALPHA[:PAIRING]; each seed sets both --seed (data order) and --noise-seed.
# COMPARE_ARGS: arguments for the compare job's tools/compare_runs.py, e.g. "--dataset sharegpt" (the
# data set whose words-per-response K the text metrics use). The tasks write no answers: the table
# has the loss columns only; for the paper's Table 4 columns generate each run's answers and compare
# with --run NAME=LOG:OUTPUTS (docs/evaluation.md).
set -euo pipefail
source examples/cluster/common.sh
export ABLATION=${ABLATION:-none:0 uniform:5 symmetric:5}
export SEEDS=${SEEDS:-1 2 3}
export RUNS=${RUNS:-runs/ablation}
read -ra settings <<< "$ABLATION"
read -ra seeds <<< "$SEEDS"
tasks=$(( ${#settings[@]} * ${#seeds[@]} ))
mkdir -p "$RUNS"
cluster_sbatch_options 1
array=$(sbatch --parsable "${sbatch_options[@]}" --job-name=symnoise-ablation --array="0-$(( tasks - 1 ))" --output="$RUNS/slurm-%A_%a.out" \
        "$@" examples/slurm_finetune.sbatch)
array=${array%%;*}
cluster_sbatch_options 0
read -ra compare_args <<< "${COMPARE_ARGS:-}"
compare=$(sbatch --parsable "${sbatch_options[@]}" --dependency="afterok:$array" --kill-on-invalid-dep=yes --output="$RUNS/slurm-%j.out" \
          examples/slurm_compare.sbatch "${compare_args[@]}")
compare=${compare%%;*}
echo "array job $array: $tasks runs (${#settings[@]} settings x ${#seeds[@]} seeds) under $RUNS"
echo "compare job $compare: after all of them succeed, $RUNS/results/table.md"
