#!/usr/bin/env bash
# The whole journey as SLURM jobs, each starting only once the one before it succeeded
# (--dependency=afterok): preprocess, convert, fine-tune, export, generate, evaluate, each
# submitted by examples/cluster/submit.sh with the cluster settings (settings.env). Run from
# the repository root; it prints the job ids and exits (the jobs' logs: WORK/logs/).
#   HF_MODEL=/lustre/models/Llama-2-70b-hf RAW_DATA=/lustre/data/alpaca_data.json \
#   PROMPTS=/lustre/data/alpaca_eval.json PRESET=llama2-70b-fp8 DATASET=alpaca NODES=8 \
#   WORK=/lustre/runs/llama2-70b-alpaca-symnoise bash examples/cluster/journey.sh
# Variables: the steps' (each script's header) and
#   STEPS     which steps, in order (default all six; e.g. "finetune export generate" with DATA
#             and CKPT from an earlier journey)
#   NODES     fine-tune nodes (default 1; PRESET=llama2-70b-fp8 takes 8 or 16)
#   AFTER     a job id the first step waits for (afterok)
#   <STEP>_SBATCH  more sbatch options for one step (FINETUNE_SBATCH="--time=24:00:00")
#   <STEP>_ARGS    arguments for one step's command (FINETUNE_ARGS="--keep-last 2 --keep-every 1000")
set -euo pipefail
[ -f examples/cluster/common.sh ] || { echo "run $0 from the repository root" >&2; exit 2; }
source examples/cluster/common.sh
journey_paths
steps=(${STEPS:-preprocess convert finetune export generate evaluate})
mkdir -p "$WORK/logs"
previous=${AFTER:-}
for step in "${steps[@]}"; do
  upper=$(echo "$step" | tr '[:lower:]' '[:upper:]')
  sbatch_name="${upper}_SBATCH" args_name="${upper}_ARGS"
  read -ra step_sbatch <<< "${!sbatch_name:-}"
  read -ra step_args <<< "${!args_name:-}"
  options=(--output="$WORK/logs/%x.%j.out" ${previous:+--dependency=afterok:$previous --kill-on-invalid-dep=yes})
  if [ "$step" = finetune ]; then
    options+=(--nodes="${NODES:-1}")
  fi
  previous=$(bash examples/cluster/submit.sh "$step" "${options[@]}" "${step_sbatch[@]}" -- "${step_args[@]}")
  echo "$step: job $previous"
done
echo "the journey's files: $WORK (answers: $OUTPUTS; evaluation: $EVALUATION)"
