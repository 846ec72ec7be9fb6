#!/usr/bin/env bash
# Start the Python baseline proxy: Gunicorn + uvicorn workers serving app:app.
#
#   STTPROXY_BACKENDS=ws://127.0.0.1:9001,ws://127.0.0.1:9002 ./run.sh
#
# Environment (all optional):
#   BIND        listen address host:port            (127.0.0.1:8090)
#   WORKERS     worker processes                    (number of cores: nproc)
#   LOG_LEVEL   gunicorn/uvicorn log level          (warning; info logs every connection)
#   PYTHON      interpreter used to create .venv    (python3)
#   BASELINE_PREPARE_ONLY=1   only create/refresh .venv, then exit
#   STTPROXY_*  proxy settings, see app.py          (STTPROXY_BACKENDS, STTPROXY_POOL_SIZE, ...)
# Extra arguments are passed on to gunicorn.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

BIND="${BIND:-127.0.0.1:8090}"
WORKERS="${WORKERS:-$(nproc)}"
LOG_LEVEL="${LOG_LEVEL:-warning}"
PYTHON="${PYTHON:-python3}"

# 1. The virtualenv: created once, reinstalled only when requirements.txt changes.
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "baseline: preparing $venv" >&2
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    echo "$want" > "$stamp"
fi

# With BASELINE_PREPARE_ONLY=1, stop here: the reproduction prepares the venv
# while it builds the Rust binaries.
if [[ "${BASELINE_PREPARE_ONLY:-0}" == "1" ]]; then
    exit 0
fi

# 2. File descriptors: every proxied session holds two sockets. Raise the soft limit to the
#    hard limit (it cannot go past it).
ulimit -n "$(ulimit -Hn)" || true

# 3. Say when a worker serves requests (the harness may also just poll the port). Bounded: 120 s.
host="${BIND%:*}"; port="${BIND##*:}"
case "$host" in ""|0.0.0.0|"[::]"|"::") probe_host=127.0.0.1 ;; *) probe_host="${host#[}"; probe_host="${probe_host%]}" ;; esac
(
    for _ in $(seq 1 1200); do
        kill -0 "$$" 2>/dev/null || exit 0   # gunicorn (this shell's pid after exec) is gone
        # A worker answers /healthz only once its pools are warm (the arbiter's socket alone
        # accepts connections earlier, while no worker is up yet).
        if status="$( (exec 3<>"/dev/tcp/$probe_host/$port" &&
                       printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$probe_host" >&3 &&
                       read -r -t 2 line <&3 && echo "$line") 2>/dev/null)" &&
           [[ "$status" == *" 200 "* ]]; then
            echo "baseline listening on ws://$BIND"
            exit 0
        fi
        sleep 0.1
    done
    echo "baseline: port $BIND did not open within 120 s" >&2
) &

# 4. Gunicorn. Long-lived websockets: --timeout 0 disables the heartbeat kill (a uvicorn
#    worker's heartbeat only stalls when its event loop does, and a benchmark wants to see the
#    stall, not a restart that hides it); a deep backlog takes thousands of sessions that all
#    connect at once; SIGTERM gives sessions --graceful-timeout seconds before workers exit.
export PYTHONUNBUFFERED=1
exec "$venv/bin/gunicorn" app:app \
    --worker-class uvicorn.workers.UvicornWorker \
    --workers "$WORKERS" \
    --bind "$BIND" \
    --backlog 4096 \
    --timeout 0 \
    --graceful-timeout 10 \
    --keep-alive 5 \
    --log-level "$LOG_LEVEL" \
    --error-logfile - \
    --no-control-socket \
    "$@"
