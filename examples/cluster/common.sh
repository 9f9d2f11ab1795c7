# Sourced by examples/cluster/submit.sh (on the login node) and by every job script of the
# journey (on the nodes), from the repository root: the cluster settings (settings.env, or
# the file SETTINGS names; the environment wins over it), the paths the steps share, and the
# srun every step runs its work with.

# shellcheck source=examples/cluster/settings.env
source "${SETTINGS:-examples/cluster/settings.env}"

# The journey's files, each step's output the next one's input. WORK holds them all unless a
# variable names another place (CKPT=/lustre/ckpt/llama2-70b to reuse a conversion).
journey_paths() {
  export WORK=${WORK:-runs/journey}
  export DATA=${DATA:-$WORK/data/train}                        # preprocess -> fine-tune (prefix)
  export CKPT=${CKPT:-$WORK/megatron}                           # convert -> fine-tune
  export OUT=${OUT:-$WORK/finetune}                             # fine-tune (--save) -> export
  export EXPORT=${EXPORT:-$WORK/hf}                             # export -> generate, evaluate
  export OUTPUTS=${OUTPUTS:-$WORK/alpaca_eval_outputs.json}     # generate -> evaluate
  export EVALUATION=${EVALUATION:-$WORK/evaluation}             # evaluate's results
}

# The settings as sbatch options, in the array sbatch_options; GPU steps also ask for the GPUs.
cluster_sbatch_options() {
  local wants_gpus=$1
  sbatch_options=(${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"} ${QOS:+--qos="$QOS"})
  if [ "${EXCLUSIVE:-1}" = 1 ]; then
    sbatch_options+=(--exclusive --mem=0)  # --exclusive alone gives all CPUs but only the default memory
  else
    if [ -z "${CPUS_PER_NODE:-}" ] || [ -z "${MEM_PER_NODE:-}" ]; then
      echo "EXCLUSIVE=0 needs CPUS_PER_NODE and MEM_PER_NODE (settings: ${SETTINGS:-examples/cluster/settings.env}):" \
           "without them a job gets one CPU and the default memory per node" >&2
      return 2
    fi
    sbatch_options+=(--cpus-per-task="$CPUS_PER_NODE" --mem="$MEM_PER_NODE")
  fi
  if [ "$wants_gpus" = 1 ]; then
    sbatch_options+=(--gpus-per-node="$GPUS_PER_NODE")
  fi
}

# The rendezvous of a multi-node torchrun: the job's first node, at the address SLURM itself
# reaches it by (node names need not resolve from the nodes), and a port derived from the job
# id below Linux's ephemeral range (32768-60999), so that it cannot collide with a port
# the kernel handed out. SLURM's values win over MASTER_ADDR, MASTER_PORT and NODE_RANK left
# in the environment the job was submitted from (each node's rank is its SLURM_NODEID).
cluster_rendezvous() {
  local first address port
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  address=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  port=$(( 20000 + SLURM_JOB_ID % 12000 ))
  if [ -n "${MASTER_ADDR:-}" ] && [ "$MASTER_ADDR" != "$address" ]; then
    echo "ignoring MASTER_ADDR=$MASTER_ADDR from the environment: the rendezvous is on the job's first node $first ($address)"
  fi
  if [ -n "${MASTER_PORT:-}" ] && [ "$MASTER_PORT" != "$port" ]; then
    echo "ignoring MASTER_PORT=$MASTER_PORT from the environment: the job's port is $port"
  fi
  if [ -n "${NODE_RANK:-}" ]; then
    echo "ignoring NODE_RANK=$NODE_RANK from the environment: each node's rank is its SLURM_NODEID"
  fi
  export MASTER_ADDR=$address MASTER_PORT=$port
  unset NODE_RANK
}

# srun with one task per node of the job, given the node's CPUs (a step gets one CPU per task
# unless it asks: torchrun and its 8 workers would share it), in the container when the
# settings name one (pyxis's flags). SRUN: another srun to call (the tests record its arguments).
cluster_srun() {
  local container=() extra=()
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    container=(--container-image="$CONTAINER_IMAGE" --container-workdir="${CONTAINER_WORKDIR:-$PWD}")
    if [ -n "${CONTAINER_MOUNTS:-}" ]; then
      container+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
    read -ra extra <<< "${CONTAINER_OPTIONS:-}"
    container+=("${extra[@]}")
  fi
  "${SRUN:-srun}" --ntasks-per-node=1 --cpus-per-task="${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=1 \
    "${container[@]}" "$@"
}
