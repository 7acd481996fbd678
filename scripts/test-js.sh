#!/usr/bin/env bash
# The browser client (clients/js): type check, unit tests against a fake socket, and the
# end-to-end test (a real herald, the demo page, headless Chromium). Installs what it needs:
# Debian's chromium if /usr/bin/chromium is missing, the npm dev tools (playwright-core,
# typescript) from the committed package-lock.json. scripts/test.sh runs it after the Rust
# tests; on its own it builds herald if the binary is not there.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

export HERALD_BIN="${HERALD_BIN:-$PWD/target/debug/herald}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ ! -x "$CHROMIUM" ]; then
  step "chromium (Debian package)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
# node:test's spec reporter and the test runner's describe/before/after as used here: 20+.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then echo "node >= 20 is required (found: ${node_major})" >&2; exit 1; fi
command -v python3 >/dev/null || { echo "python3 is required (the demo's static server)" >&2; exit 1; }

if [ ! -x "$HERALD_BIN" ]; then
  step "herald binary"
  cargo build --locked --bins
fi

step "npm ci (clients/js dev tools)"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)

step "type check (herald.d.ts against the README usage)"
(cd clients/js && npx --no-install tsc --noEmit -p test/tsconfig.json)

step "JS client: unit tests and end-to-end in headless Chromium"
mkdir -p target/js-e2e
LOG=target/js-e2e/node-test.log
(cd clients/js && node --test --test-reporter=spec test/client.test.js test/e2e.test.js) 2>&1 | tee "$LOG"

# node's own summary, then one plain line like test.sh's for the Rust tests.
pass=$(grep -o '^ℹ pass [0-9]*' "$LOG" | awk '{print $3}')
fail=$(grep -o '^ℹ fail [0-9]*' "$LOG" | awk '{print $3}')
echo
echo "js: ${pass:-0} passed, ${fail:-?} failed (screenshot: target/js-e2e/demo.png)"
