#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient (cases 1.* to 10.*) against the release server.
#
#   tests/autobahn/run.sh [OUTDIR]        (default target/autobahn)
#
# Uses the Python 3 port of wstest in ../shared/autobahn (set AUTOBAHN_DIR to move it),
# installing it under /tmp/ab on first use. Fails on any FAILED case and on any case where
# the server dropped TCP without sending a Close frame first. Outside this workplace, run
# the same spec (tests/autobahn/fuzzingclient.json) with the upstream image:
#   docker run --rm --network host -v "$PWD/tests/autobahn:/config" -v "$PWD/target/autobahn:/reports" \
#     crossbario/autobahn-testsuite wstest -m fuzzingclient -s /config/fuzzingclient.json
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${1:-target/autobahn}"
AUTOBAHN_DIR="${AUTOBAHN_DIR:-../shared/autobahn}"
export WSTEST="${WSTEST:-/tmp/ab/venv/bin/wstest}"
[ -x "$WSTEST" ] || bash "$AUTOBAHN_DIR/setup.sh" "$(dirname "$(dirname "$(dirname "$WSTEST")")")"

cargo build --release --quiet --bin server
mkdir -p "$OUTDIR"
log="$OUTDIR/server.log"
target/release/server --host 127.0.0.1 --port 0 --metrics-port 0 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q 'Listening on ws://' "$log" && break; sleep 0.1; done
url=$(grep -o 'ws://[^ ]*' "$log" | head -n1)
[ -n "$url" ] || { echo "server did not start:"; cat "$log"; exit 1; }

NO_DROPS=1 bash "$AUTOBAHN_DIR/run_fuzzingclient.sh" "$url" websocket-test "$OUTDIR"

kill -TERM $server
wait $server
trap - EXIT
echo "server exited cleanly after the run"
