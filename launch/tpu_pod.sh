#!/usr/bin/env bash
# Runs lit_jax on every worker of a Cloud TPU VM slice (each worker runs the same command;
# jax.distributed.initialize() finds the others by itself on TPU).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/llama3_8b.py --workdir=gs://bucket/run \
#       --config.model.source=/mnt/models/Meta-Llama-3-8B-Instruct --config.mesh.shape='(1,-1,1)'
#
# Setup once per slice (same command on all workers):
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     "git clone <repo> lit_jax && cd lit_jax && python3 -m venv .venv && . .venv/bin/activate && \
#      pip install -e . 'jax[tpu]'"
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [lit_jax.main flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/lit_jax && . .venv/bin/activate && python -m lit_jax.main${args} --config.mesh.distributed=True"
