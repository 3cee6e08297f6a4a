#!/usr/bin/env bash
# Run every benchmark at its smoke size (bench/bench_*.py --smoke), one after the other.
#
# A benchmark nobody runs breaks silently, so CI runs this after the tests. Benches are found
# by glob: a new bench/bench_*.py is included without editing this file, and must accept
# --smoke. Prints one line per bench (exit status, wall seconds) and exits 1 if any failed or
# timed out; a failed bench's log tail is shown. Speed targets never fail a smoke run.
#
#   bash bench/smoke.sh                         # all benches
#   bash bench/smoke.sh detect storage          # only bench_detect.py and bench_storage.py
#
# Environment: PYTHON (default .venv/bin/python), SMOKE_TIMEOUT seconds per bench (default 600:
# a smoke takes seconds to a minute on an idle machine, several on a loaded one), PREFECT_API_URL (an
# API for the flow benches; without it this script starts one Prefect server that they all share).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
limit=${SMOKE_TIMEOUT:-600}

benches=()
for path in bench/bench_*.py; do
    name=$(basename "$path" .py)
    if [ $# -gt 0 ]; then
        wanted=0
        for arg in "$@"; do
            arg=${arg##*/}
            arg=${arg%.py}
            [ "$name" = "bench_${arg#bench_}" ] && wanted=1
        done
        [ $wanted = 1 ] || continue
    fi
    benches+=("$path")
done
if [ ${#benches[@]} -eq 0 ]; then
    echo "smoke: no bench/bench_*.py matches: $*" >&2
    exit 1
fi

logs=$(mktemp -d "${TMPDIR:-/tmp}/facecap-bench-smoke.XXXXXX")

# One Prefect API for every flow bench: each would otherwise boot a server of its own (10-40 s on a
# loaded machine), a cost none of them measures. bench_startup drops PREFECT_API_URL, since the server's
# start is part of what it measures.
server=""
stop_server() {
    if [ -n "$server" ]; then
        kill -TERM -- "-$server" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server" 2>/dev/null
        wait "$server" 2>/dev/null
        server=""
    fi
}
if [ -z "${PREFECT_API_URL:-}" ]; then
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$logs/prefect-home"
    PREFECT_HOME="$logs/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false setsid \
        "$(dirname "$python")/prefect" server start --host 127.0.0.1 --port "$port" --no-ui \
        >"$logs/prefect-server.log" 2>&1 &
    server=$!
    trap stop_server EXIT
    export PREFECT_API_URL="http://127.0.0.1:$port/api"
    if ! "$python" - "$PREFECT_API_URL" <<'PY'
import sys
import time

import httpx

deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        if httpx.get(sys.argv[1] + "/health", timeout=5).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
    then
        echo "smoke: the Prefect server did not answer at $PREFECT_API_URL within 180 s:" >&2
        tail -n 40 "$logs/prefect-server.log" >&2
        exit 1
    fi
fi
failed=()
for path in "${benches[@]}"; do
    name=$(basename "$path")
    log="$logs/${name%.py}.log"
    started=$(date +%s%N)
    # timeout signals the bench's whole process group: Dask workers and servers it started go too.
    timeout -k 15 "$limit" "$python" "$path" --smoke >"$log" 2>&1
    status=$?
    tenths=$(( ($(date +%s%N) - started) / 100000000 ))
    case $status in
        0) verdict="ok" ;;
        124|137) verdict="TIMEOUT after ${limit} s"; failed+=("$name") ;;
        *) verdict="FAILED (exit $status)"; failed+=("$name") ;;
    esac
    printf 'smoke %-24s %5d.%d s  %s\n' "$name" $((tenths / 10)) $((tenths % 10)) "$verdict"
    if [ "$status" != 0 ]; then
        sed 's/^/    | /' "$log" | tail -n 40
    fi
done

stop_server
if [ ${#failed[@]} -gt 0 ]; then
    echo "smoke: ${#failed[@]} of ${#benches[@]} failed: ${failed[*]} (logs in $logs)"
    exit 1
fi
rm -rf "$logs"
echo "smoke: all ${#benches[@]} benches passed"
