#!/usr/bin/env bash
# Submit one step of the journey with the cluster settings (examples/cluster/settings.env) as
# sbatch options; prints the job id. Run it from the repository root.
#   bash examples/cluster/submit.sh STEP [sbatch options ...] [-- the step's own arguments ...]
#   HF_MODEL=/lustre/models/Llama-2-70b-hf bash examples/cluster/submit.sh convert
#   PRESET=llama2-70b-fp8 bash examples/cluster/submit.sh finetune --nodes=8 --time=24:00:00 -- --keep-last 2
# STEP: preprocess, convert, finetune, export, generate, evaluate (examples/cluster/STEP.sbatch;
# finetune is examples/slurm_finetune.sbatch). sbatch options given here win over the settings
# and over the script's #SBATCH lines. examples/cluster/journey.sh submits them all, chained.
set -euo pipefail
[ -f examples/cluster/common.sh ] || { echo "run $0 from the repository root" >&2; exit 2; }
source examples/cluster/common.sh
step=${1:?"STEP: preprocess, convert, finetune, export, generate or evaluate"}
shift
case "$step" in
  preprocess|convert|export) script=examples/cluster/$step.sbatch gpus=0 ;;  # CPU and memory work
  generate|evaluate) script=examples/cluster/$step.sbatch gpus=1 ;;
  finetune) script=examples/slurm_finetune.sbatch gpus=1 ;;
  *) echo "unknown STEP $step (preprocess, convert, finetune, export, generate, evaluate)" >&2; exit 2 ;;
esac
options=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
cluster_sbatch_options "$gpus"
job=$(sbatch --parsable "${sbatch_options[@]}" "${options[@]}" "$script" "$@")
echo "${job%%;*}"
