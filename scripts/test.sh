#!/usr/bin/env bash
# The test command: every test on the embedded SQLite store, then the whole integration suite again on
# PostgreSQL (each test in a schema of its own) when one is reachable.
#   JOBHOOK_TEST_POSTGRES_URL   the database for the second pass (default postgres://postgres@127.0.0.1:5432/test)
# With CI=true a missing PostgreSQL fails the run instead of skipping the pass.
set -euo pipefail
cd "$(dirname "$0")/.."
url=${JOBHOOK_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export JOBHOOK_TEST_POSTGRES_URL=$url

echo "=== pass 1 of 2: SQLite"
cargo test "$@"

# Is anything listening where the URL points?
hostport=$(printf '%s' "$url" | sed -E 's#^[a-z]+://([^@/]*@)?([^/?]+).*#\2#')
host=${hostport%:*}; port=${hostport##*:}
[ "$host" = "$hostport" ] && port=5432
if timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then reachable=yes; else reachable=no; fi
if [ "$reachable" != yes ]; then
  if [ "${CI:-}" = true ]; then
    echo "PostgreSQL is not reachable at $url, and CI needs the PostgreSQL pass" >&2
    exit 1
  fi
  echo "=== pass 2 of 2: PostgreSQL SKIPPED: nothing answers at $url"
  echo "    To run it, start PostgreSQL or set JOBHOOK_TEST_POSTGRES_URL=postgres://user@host:port/db"
  exit 0
fi
# Each test works in a schema of its own and leaves it (to look at after a failure). Hundreds of them
# bloat the database's catalogs, which slows everything on that server (the PostgreSQL benchmark by
# ~15 %): dropped before the pass, and again after a pass that succeeded.
drop_test_schemas() {
  command -v psql >/dev/null || return 0
  psql "$url" -Atqc "SELECT 'DROP SCHEMA ' || schema_name || ' CASCADE;' FROM information_schema.schemata WHERE schema_name LIKE 'jh_t_%'" \
    | psql "$url" -q >/dev/null 2>&1 || true
}
drop_test_schemas
echo "=== pass 2 of 2: PostgreSQL ($url)"
JOBHOOK_TEST_BACKEND=postgres cargo test --test api "$@"
drop_test_schemas
