#!/usr/bin/env bash
# Start a Prefect worker that runs flow runs of the cnnpipe deployments as local processes, in the
# project environment (so torch, torchrun and the flows are importable). It creates the `process`
# work pool on the server if it does not exist yet. Run one per machine that should train.
#
# Environment (all optional):
#   PREFECT_API_URL=http://127.0.0.1:4200/api   the server (infra/prefect-server.sh)
#   CNNPIPE_WORK_POOL=cnnpipe-process           must match `cnnpipe deploy --work-pool`
#   CNNPIPE_WORKER_NAME=<host>-cnnpipe
#   MLFLOW_TRACKING_URI                         inherited by every flow run it starts
#   PREFECT_WORKER_QUERY_SECONDS=10             how often it polls for scheduled runs
# Extra arguments go to `prefect worker start` (e.g. --limit 1 for one run at a time).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
CNNPIPE_WORK_POOL="${CNNPIPE_WORK_POOL:-cnnpipe-process}"
CNNPIPE_WORKER_NAME="${CNNPIPE_WORKER_NAME:-$(hostname)-cnnpipe}"

echo "prefect-worker: pool=$CNNPIPE_WORK_POOL api=$PREFECT_API_URL" \
     "mlflow=${MLFLOW_TRACKING_URI:-<unset: sqlite:///mlflow.db in the run directory>}" >&2
exec uv run prefect worker start \
    --pool "$CNNPIPE_WORK_POOL" \
    --type process \
    --name "$CNNPIPE_WORKER_NAME" \
    "$@"
