#!/usr/bin/env bash
# Make sure the local PostgreSQL (127.0.0.1:5432, trust auth, user postgres) is up: the
# inbox and offline tests create a database per test on it. Start the cluster if it is down.
set -euo pipefail

up() { pg_isready -q -h 127.0.0.1 -p 5432 -U postgres >/dev/null 2>&1; }

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "ensure-postgres: pg_isready not found; installing postgresql (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if ! up; then
  echo "ensure-postgres: PostgreSQL is down; starting it" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
fi
for _ in $(seq 1 60); do
  if up; then
    echo "ensure-postgres: PostgreSQL is up" >&2
    exit 0
  fi
  sleep 1
done
echo "ensure-postgres: PostgreSQL did not start within about a minute" >&2
exit 1
