#!/usr/bin/env bash
# Make sure the local RabbitMQ broker (127.0.0.1:5672, guest/guest) is up: start it if it
# is down, then wait until it has finished booting. Used by the test command and CI.
set -euo pipefail

if ! command -v rabbitmqctl >/dev/null 2>&1; then
  echo "ensure-rabbitmq: rabbitmqctl not found; installing rabbitmq-server (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "ensure-rabbitmq: broker is down; starting it" >&2
  rabbitmq-server -detached || true
fi

# await_startup blocks until the node has booted (or fails if it is not running yet).
for _ in $(seq 1 60); do
  if rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1; then
    echo "ensure-rabbitmq: broker is up" >&2
    exit 0
  fi
  sleep 1
done
echo "ensure-rabbitmq: RabbitMQ did not start within about a minute" >&2
exit 1
