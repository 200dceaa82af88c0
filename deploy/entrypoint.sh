#!/bin/bash
# The container's entry point (deploy/Dockerfile): tritonserver with its own HTTP on loopback only,
# Kiln's HTTP guard (pipeline/serving/http_guard.py) on the published HTTP port in front of it,
# as `kiln serve` runs them (docs/decisions.md: a form-encoded body over ~4 MiB crashes
# tritonserver 2.51's HTTP frontend). Either process ending ends the container with its status,
# so the orchestrator's restart policy takes over. Extra arguments go to tritonserver. On SIGTERM the
# Kiln model is first told to end its running requests (the file $KILN_DRAIN_FILE, as `kiln serve`
# does), so tritonserver finds nothing in flight and unloads it gracefully.
set -u
export KILN_DRAIN_FILE=${KILN_DRAIN_FILE:-$(mktemp -u /tmp/kiln-drain.XXXXXX)}
MODEL_REPOSITORY=${MODEL_REPOSITORY:-/models}
HTTP_PORT=${HTTP_PORT:-8000}
TRITON_HTTP_PORT=${TRITON_HTTP_PORT:-8010}
MAX_BODY_BYTES=${MAX_BODY_BYTES:-1048576}

"${TRITONSERVER:-tritonserver}" --model-repository="$MODEL_REPOSITORY" --exit-on-error=true --log-verbose=0 \
    --http-address=127.0.0.1 --http-port="$TRITON_HTTP_PORT" --exit-timeout-secs=5 "$@" &
"${PYTHON:-python3}" "${HTTP_GUARD:-/opt/kiln/http_guard.py}" --listen "0.0.0.0:$HTTP_PORT" \
    --upstream "http://127.0.0.1:$TRITON_HTTP_PORT" --max-body-bytes "$MAX_BODY_BYTES" &
trap 'touch "$KILN_DRAIN_FILE"; sleep 1; kill -TERM $(jobs -p) 2>/dev/null; wait' TERM INT
wait -n
status=$?
kill -TERM $(jobs -p) 2>/dev/null
wait
exit "$status"
