#!/usr/bin/env bash
# Start an MLflow tracking server: SQLite backend store + an artifact directory it serves itself
# (--serve-artifacts), so clients need only the URL, not access to the artifact disk.
#
# The defaults are MLflow's own file names in the project root (mlflow.db, mlartifacts/), i.e. the
# same SQLite store that `cnnpipe train` uses without a server: moving from the embedded default
# to a server keeps every earlier run and registered model.
#
# Environment (all optional):
#   MLFLOW_HOST=127.0.0.1          bind address; 0.0.0.0 to serve other machines (see README)
#   MLFLOW_PORT=5000
#   MLFLOW_BACKEND_STORE_URI=sqlite:///<root>/mlflow.db
#   MLFLOW_ARTIFACTS_DESTINATION=<root>/mlartifacts
#   MLFLOW_WORKERS=2               server worker processes
# Extra arguments go to `mlflow server` (e.g. --allowed-hosts, --dev).
# Then: export MLFLOW_TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$ROOT/mlflow.db}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$ROOT/mlartifacts}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"

case "$MLFLOW_ARTIFACTS_DESTINATION" in
    *://*) ;;                                      # remote store (s3://, gs://, ...)
    *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;;
esac
case "$MLFLOW_BACKEND_STORE_URI" in
    sqlite:///*) mkdir -p "$(dirname "${MLFLOW_BACKEND_STORE_URI#sqlite:///}")" ;;
esac

echo "mlflow-server: http://$MLFLOW_HOST:$MLFLOW_PORT store=$MLFLOW_BACKEND_STORE_URI" \
     "artifacts=$MLFLOW_ARTIFACTS_DESTINATION" >&2
echo "mlflow-server: clients use MLFLOW_TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT" >&2
exec uv run mlflow server \
    --host "$MLFLOW_HOST" \
    --port "$MLFLOW_PORT" \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --workers "$MLFLOW_WORKERS" \
    "$@"
