#!/usr/bin/env bash
# Runs `jaxzero train` on every worker of a Cloud TPU pod slice.
#
# JAX's multi-controller runtime discovers the pod itself (jax.distributed.initialize()
# auto-detects TPU workers), so every worker runs the same command.
#
# Environment:
#   TPU_NAME      name of the TPU VM (required)
#   ZONE          its zone (required)
#   PROJECT       GCP project (optional; gcloud's default otherwise)
#   CONFIG        config file, default configs/qwen2.5-7b.yaml
#   REPO_DIR      where jaxzero is checked out on the workers, default ~/jaxzero
#   RUN_DIR       run directory: a gs://BUCKET/PATH URL (each worker works in a local mirror
#                 of it; a new slice resumes from the bucket alone), or shared storage every
#                 worker sees (NFS, a GCS fuse mount), e.g. gs://my-bucket/runs/qwen7b
#   CHECKPOINT_DIR  optional gs://BUCKET/PATH for the checkpoints: orbax commits there with a
#                 marker file, where a flat bucket's gcsfuse mount cannot rename atomically
#   EXTRA_ARGS    further dotted overrides, e.g. "rollout.n=8 optim.lr=1e-6"
#   SETUP=1       first install jaxzero with TPU jax on every worker
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/qwen2.5-7b.yaml}
REPO_DIR=${REPO_DIR:-~/jaxzero}
RUN_DIR=${RUN_DIR:?set RUN_DIR to a gs:// URL or shared storage visible from every worker}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && \
    pip install -U 'jax[tpu]' && pip install -e '.[gcs]'"
fi

ssh_all "cd $REPO_DIR && . .venv/bin/activate && \
  JAXZERO_DISTRIBUTED=1 jaxzero train $CONFIG trainer.run_dir=$RUN_DIR \
  ${CHECKPOINT_DIR:+trainer.checkpoint_dir=$CHECKPOINT_DIR} ${EXTRA_ARGS:-} \
  2>&1 | tee -a /tmp/jaxzero-train.log"
