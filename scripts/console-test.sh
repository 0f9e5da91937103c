#!/usr/bin/env bash
# The console in a real browser (tests/console/browser-test.mjs): Debian's chromium driven by
# playwright-core, against the real binary, once on SQLite and once on PostgreSQL (a fresh schema) when
# one is reachable. Nothing downloads a browser: playwright-core ships none, and the script launches
# /usr/bin/chromium.
# Usage: scripts/console-test.sh [path/to/jobhook]   (default: target/debug/jobhook)
#   SCREENSHOTS=docs   also save the README's screenshots (docs/console-*.png) from the SQLite pass
#   JOBHOOK_TEST_POSTGRES_URL   the PostgreSQL database (default postgres://postgres@127.0.0.1:5432/test);
#   with CI=true a missing PostgreSQL fails the run instead of skipping that pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/jobhook}")
command -v chromium >/dev/null || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 1; }
(cd tests/console && npm ci --silent --no-audit --no-fund >/dev/null)

echo "=== console browser test, pass 1 of 2: SQLite"
SCREENSHOTS=${SCREENSHOTS:+$(realpath "$SCREENSHOTS")} node tests/console/browser-test.mjs "$bin"

url=${JOBHOOK_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
if ! command -v psql >/dev/null || ! psql "$url" -Atqc "SELECT 1" >/dev/null 2>&1; then
  if [ "${CI:-}" = true ]; then
    echo "PostgreSQL is not reachable at $url, and CI needs the PostgreSQL pass" >&2
    exit 1
  fi
  echo "=== console browser test, pass 2 of 2: PostgreSQL SKIPPED: nothing answers at $url"
  exit 0
fi
schema="jh_console_$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
psql "$url" -qc "CREATE SCHEMA $schema"
trap 'psql "$url" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true' EXIT
separator='?'; [[ "$url" == *\?* ]] && separator='&'
echo "=== console browser test, pass 2 of 2: PostgreSQL ($url, schema $schema)"
JOBHOOK_TEST_DATABASE_URL="$url${separator}options=-c%20search_path%3D$schema" node tests/console/browser-test.mjs "$bin"
