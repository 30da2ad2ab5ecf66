#!/usr/bin/env bash
# Start a self-hosted Prefect server (API + UI) that deployments, workers and flows talk to.
# Its state is a SQLite database under PREFECT_HOME (Prefect's default: ~/.prefect/prefect.db).
# Start a worker next with infra/prefect-worker.sh and create the scheduled deployments with
# `cnnpipe deploy`; either one creates the `process` work pool when it is missing.
#
# Environment (all optional; these are Prefect's own setting names):
#   PREFECT_SERVER_API_HOST=127.0.0.1   bind address; 0.0.0.0 to serve workers on other machines
#   PREFECT_SERVER_API_PORT=4200
#   PREFECT_HOME=~/.prefect             where the database and logs live
#   PREFECT_API_DATABASE_CONNECTION_URL  another database (e.g. PostgreSQL for many workers)
# Extra arguments go to `prefect server start` (e.g. --no-ui, --workers 2).
# Then: export PREFECT_API_URL=http://$PREFECT_SERVER_API_HOST:$PREFECT_SERVER_API_PORT/api
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PREFECT_SERVER_API_HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
PREFECT_SERVER_API_PORT="${PREFECT_SERVER_API_PORT:-4200}"
# The server must not try to reach itself through a client URL set for workers in this shell.
unset PREFECT_API_URL

echo "prefect-server: http://$PREFECT_SERVER_API_HOST:$PREFECT_SERVER_API_PORT (home ${PREFECT_HOME:-~/.prefect})" >&2
echo "prefect-server: clients use PREFECT_API_URL=http://$PREFECT_SERVER_API_HOST:$PREFECT_SERVER_API_PORT/api" >&2
exec uv run prefect server start \
    --host "$PREFECT_SERVER_API_HOST" \
    --port "$PREFECT_SERVER_API_PORT" \
    --analytics-off \
    "$@"
