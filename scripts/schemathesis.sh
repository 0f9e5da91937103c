#!/usr/bin/env bash
# Schemathesis against openapi.yaml and the running binary: no 5xx, every response as documented. Every
# check but use_after_free: a cancelled subscription stays readable by design (see schemathesis.toml).
# Usage: scripts/schemathesis.sh [path/to/jobhook] [seconds]   (needs `st`, from: pip install schemathesis)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/jobhook}
seconds=${2:-60}
st=${VENV:+$VENV/bin/}st
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); api=$(port)
key="schemathesis-key-0123456789"
"$bin" mock-upstream --listen "127.0.0.1:$up" >"$work/mock.log" 2>&1 & pids+=($!)
JOBHOOK_LISTEN="127.0.0.1:$api" JOBHOOK_DATABASE_URL="sqlite://$work/st.db" JOBHOOK_UPSTREAM_URL="http://127.0.0.1:$up" \
  JOBHOOK_API_KEYS="$key" JOBHOOK_ALLOW_PRIVATE_CALLBACKS=true "$bin" serve >"$work/serve.log" 2>&1 & pids+=($!)
for _ in $(seq 1 200); do grep -q "listening on" "$work/serve.log" && break; sleep 0.1; done
"$st" --config-file schemathesis.toml run openapi.yaml --url "http://127.0.0.1:$api" \
  -H "Authorization: Bearer $key" --checks all --exclude-checks use_after_free --max-time "$seconds" --no-color
if grep -q " ERROR " "$work/serve.log"; then
  echo "the service logged errors during the run:"; grep " ERROR " "$work/serve.log" | head -20; exit 1
fi
