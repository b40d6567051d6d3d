#!/usr/bin/env bash
# Multi-node CUDA training under SLURM: one process per node, each driving its local GPUs,
# joined through jax.distributed (JAX reads SLURM's variables itself).
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/launch_slurm.sh configs/qwen2.5-7b.yaml [overrides]
#
# Environment:
#   VENV      virtualenv with jaxzero and jax[cuda12] installed, default ./.venv
#   RUN_DIR   run directory on storage shared by all nodes (required)
# SLURM provides SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID and the node list; JAX derives the
# coordinator (first node), process count and process id from them. To launch without SLURM,
# set JAXZERO_COORDINATOR=host:port, JAXZERO_NUM_PROCESSES and JAXZERO_PROCESS_ID on every
# process instead.
#SBATCH --job-name=jaxzero
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: launch_slurm.sh CONFIG [overrides...]}
shift
: "${RUN_DIR:?set RUN_DIR to shared storage}"
VENV=${VENV:-./.venv}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
srun --ntasks-per-node=1 bash -c "source $VENV/bin/activate && \
  JAXZERO_DISTRIBUTED=1 jaxzero train $CONFIG trainer.run_dir=$RUN_DIR $*"
