#!/usr/bin/env bash
# Interop check, as a user would run it: the real jobhook binary and its mock upstream, and the example
# receivers verifying real deliveries with the stock standardwebhooks libraries (PyPI and npm).
# Usage: scripts/interop.sh [path/to/jobhook]   (default: target/debug/jobhook)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/jobhook}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # file pattern seconds
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "FAILED: no '$2' in $1 after $3 s"; cat "$1"; return 1
}

# The stock verifiers (VENV: a virtualenv that already has standardwebhooks, as .ci/run makes).
venv=${VENV:-$work/venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet standardwebhooks
fi
(cd examples/receivers/node && npm ci --silent --no-audit --no-fund >/dev/null)
cargo build --quiet --example rust-receiver
rust_receiver=target/debug/examples/rust-receiver

key="interop-key-0123456789abcdef"
secret="whsec_$(head -c 32 /dev/urandom | base64)"
up=$(port); api=$(port); py=$(port); js=$(port); rs=$(port)

"$bin" mock-upstream --listen "127.0.0.1:$up" --pending-polls 2 >"$work/mock.log" 2>&1 & pids+=($!)
JOBHOOK_LISTEN="127.0.0.1:$api" JOBHOOK_DATABASE_URL="sqlite://$work/jobhook.db" JOBHOOK_UPSTREAM_URL="http://127.0.0.1:$up" \
  JOBHOOK_API_KEYS="$key" JOBHOOK_SIGNING_SECRET="$secret" JOBHOOK_ALLOW_PRIVATE_CALLBACKS=true JOBHOOK_POLL_INTERVAL=100ms \
  "$bin" serve >"$work/serve.log" 2>&1 & pids+=($!)
JOBHOOK_SIGNING_SECRET="$secret" "$venv/bin/python" examples/receivers/python/receiver.py "$py" >"$work/py.log" 2>&1 & pids+=($!)
JOBHOOK_SIGNING_SECRET="$secret" node examples/receivers/node/receiver.mjs "$js" >"$work/js.log" 2>&1 & pids+=($!)
JOBHOOK_SIGNING_SECRET="$secret" "$rust_receiver" "$rs" >"$work/rs.log" 2>&1 & pids+=($!)
wait_for "$work/serve.log" "listening on" 20
wait_for "$work/py.log" "listening" 20
wait_for "$work/js.log" "listening" 20
wait_for "$work/rs.log" "listening" 20

register() { # job receiver-port [more JSON members]: registers, answer in $work/reg.json, exits unless 201
  local code
  code=$(curl -s -o "$work/reg.json" -w '%{http_code}' -X POST "http://127.0.0.1:$api/v1/subscriptions" \
    -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d "{\"job_id\": \"$1\", \"callback_url\": \"http://127.0.0.1:$2/hook\"${3:-}}")
  [ "$code" = 201 ] || { echo "FAILED: registration answered $code: $(cat "$work/reg.json")"; exit 1; }
}

job=$(python3 -c 'import uuid; print(uuid.uuid4())')
subs=()
for target in "$py" "$js" "$rs"; do
  register "$job" "$target"
  subs+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$work/reg.json")")
done
wait_for "$work/py.log" "verified msg_.* (job.succeeded): job $job is Succeed" 20
wait_for "$work/js.log" "verified msg_.* (job.succeeded): job $job is Succeed" 20
wait_for "$work/rs.log" "verified msg_.* (job.succeeded): job $job is \"Succeed\"" 20

# A redelivery comes under the same webhook-id: each example drops it as a duplicate (and still says 2xx).
for sub in "${subs[@]}"; do
  curl -sf -o /dev/null -X POST "http://127.0.0.1:$api/v1/subscriptions/$sub/redeliver" -H "Authorization: Bearer $key"
done
for log in py js rs; do wait_for "$work/$log.log" "duplicate msg_" 20; done

# Rotate the secret: during the grace period receivers holding the old secret keep verifying, and a
# receiver given the new one verifies too.
new_secret=$(curl -s -X POST "http://127.0.0.1:$api/v1/signing-secret/rotate" -H "Authorization: Bearer $key" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
py2=$(port)
JOBHOOK_SIGNING_SECRET="$new_secret" "$venv/bin/python" examples/receivers/python/receiver.py "$py2" >"$work/py2.log" 2>&1 & pids+=($!)
wait_for "$work/py2.log" "listening" 20
job2=$(python3 -c 'import uuid; print(uuid.uuid4())')
for target in "$py" "$js" "$rs" "$py2"; do register "$job2" "$target"; done
wait_for "$work/py.log" "verified msg_.* (job.succeeded): job $job2 is Succeed" 20
wait_for "$work/js.log" "verified msg_.* (job.succeeded): job $job2 is Succeed" 20
wait_for "$work/rs.log" "verified msg_.* (job.succeeded): job $job2 is \"Succeed\"" 20
wait_for "$work/py2.log" "verified msg_.* (job.succeeded): job $job2 is Succeed" 20

# The envelope form: each example verifies it and finds the job status in `data`.
job3=$(python3 -c 'import uuid; print(uuid.uuid4())')
for target in "$py" "$js" "$rs"; do register "$job3" "$target" ', "payload": "envelope", "metadata": {"order": 7}'; done
wait_for "$work/py.log" "verified msg_.* (job.succeeded): job $job3 is Succeed" 20
wait_for "$work/js.log" "verified msg_.* (job.succeeded): job $job3 is Succeed" 20
wait_for "$work/rs.log" "verified msg_.* (job.succeeded): job $job3 is \"Succeed\"" 20
if grep -q REJECTED "$work/py.log" "$work/js.log" "$work/rs.log" "$work/py2.log"; then echo "FAILED: a receiver rejected a signature"; exit 1; fi
echo "Python, Node and Rust standardwebhooks verified real deliveries, dropped a redelivery as a duplicate, verified again after a secret rotation, and read the envelope form."
echo "interop: 10 passed, 0 failed"
