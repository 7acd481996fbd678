#!/usr/bin/env bash
# The whole test suite, from a fresh clone: the broker, every Rust test (unit and
# integration, against the real RabbitMQ), schemathesis against the running service,
# and the deployment checks. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "RabbitMQ"
scripts/ensure-rabbitmq.sh

step "PostgreSQL (the inbox and offline tests make a database per test)"
scripts/ensure-postgres.sh

step "Rust tests (cargo nextest)"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo build --locked --bins
cargo nextest run --locked --workspace --no-fail-fast 2>&1 | tee target/nextest-main.log

step "broker restart under load (stops the machine's RabbitMQ, so it runs alone)"
cargo nextest run --locked --workspace --run-ignored only 2>&1 | tee target/nextest-alone.log
scripts/ensure-rabbitmq.sh

step "browser client (clients/js): unit tests, then the demo page against herald in headless Chromium"
scripts/test-js.sh

step "Python tools (schemathesis) in target/ci-venv"
VENV=target/ci-venv
if [ ! -x "$VENV/bin/st" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
fi

step "schemathesis against a running herald (embedded backend)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY="schemathesis-key-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
LOG=target/schemathesis-herald.log
HERALD__HTTP__ADDR="127.0.0.1:$PORT" HERALD__AUTH__API_KEYS="$KEY" HERALD__LOG__LEVEL=warn \
  target/debug/herald serve >"$LOG" 2>&1 &
HERALD_PID=$!
trap 'kill $HERALD_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
# No 5xx, and every response conforms to openapi.yaml (status, headers, content type,
# body schema), for generated valid and invalid requests. positive_data_acceptance is left
# out: the API rightly refuses some schema-valid bodies (duplicate device ids, provider
# payloads over 4 KiB), rules a JSON schema cannot express.
"$VENV/bin/st" run openapi.yaml \
  --url "http://127.0.0.1:$PORT" \
  --header "Authorization: Bearer $KEY" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-time "${SCHEMATHESIS_SECONDS:-60}" \
  --seed 1 \
  --warnings off

step "deployment checks (kustomize render, schema validation, policy scan, metric names)"
curl -fsS "http://127.0.0.1:$PORT/metrics" > target/metrics.txt
kill $HERALD_PID; wait $HERALD_PID 2>/dev/null || true
trap - EXIT
if [ -x deploy/check.sh ]; then
  deploy/check.sh target/metrics.txt
fi

# One plain closing line for whoever reads the end of the log: the Rust test count
# (schemathesis and the deploy checks print their own summaries above).
passed=$(grep -ho 'tests\? run: [0-9]* passed' target/nextest-main.log target/nextest-alone.log | grep -o '[0-9]* passed' | awk '{s+=$1} END {print s+0}')
echo
echo "all test stages passed"
echo "rust: ${passed} passed, 0 failed"
