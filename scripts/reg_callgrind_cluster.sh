#!/bin/bash
# Instructions per registration of one cluster-mode gateway (RabbitMQ on 127.0.0.1, a
# throwaway vhost), release build: an api,dispatcher process beside one gateway under
# callgrind; scripts/reg_instructions.py opens N sessions (2 in flight) and holds them while
# the counters are dumped, then an idle window of the same length is dumped for the
# baseline. Per session = (OUT.<pid>.1 total - OUT.<pid>.2 total) / N
# (grep ^summary OUT.*). docs/benchmarks.md, "Instructions per registration".
# usage: scripts/reg_callgrind_cluster.sh BIN [N] [OUT_PREFIX]
set -u
BIN=$1; N=${2:-300}; OUT=${3:-$PWD/cg}
SECRET=0123456789abcdef0123456789abcdef
VH=prof-reg-$$
rabbitmqctl add_vhost $VH >/dev/null; rabbitmqctl set_permissions -p $VH guest ".*" ".*" ".*" >/dev/null
URL="amqp://guest:guest@127.0.0.1:5672/$VH"
common() { env HERALD__QUEUE__URL=$URL HERALD__AUTH__DEVICE_TOKEN_SECRET=$SECRET HERALD__LOG__LEVEL=warn \
  HERALD__AUTH__API_KEYS=prof-key-0123456789abcdef HERALD__HTTP__WORKERS=1 \
  HERALD__GATEWAY__MAX_SESSION_RATE=1000000 HERALD__GATEWAY__SESSION_BURST=1000000 \
  HERALD__GATEWAY__IP_CONNECTS_PER_SECOND=1000000 HERALD__GATEWAY__IP_CONNECT_BURST=1000000 "$@"; }
common HERALD__HTTP__ADDR=127.0.0.1:18940 HERALD__ROLES=api,dispatcher HERALD__CLUSTER__NODE_ID=disp $BIN serve > "$OUT.dispatcher.log" 2>&1 &
DP=$!
until curl -sf http://127.0.0.1:18940/readyz >/dev/null; do sleep 0.2; done
common HERALD__HTTP__ADDR=127.0.0.1:18941 HERALD__ROLES=gateway HERALD__CLUSTER__NODE_ID=gw \
  valgrind --tool=callgrind --callgrind-out-file=$OUT.%p $BIN serve > "$OUT.gateway.log" 2>&1 &
GP=$!
until curl -sf http://127.0.0.1:18941/readyz >/dev/null; do sleep 0.5; done
VP=$(pgrep -f "callgrind-out-file=$OUT" | head -1)
sleep 2
callgrind_control -z $VP >/dev/null
sleep 0.1
# Idle window first (same length as the sessions window, roughly), then N sessions.
T0=$(date +%s.%N)
rm -f /tmp/reg.out; mkfifo /tmp/hold.$$
python3 "$(dirname "$0")/reg_instructions.py" 18941 $SECRET $N 2 < /tmp/hold.$$ > /tmp/reg.out &
PY=$!
exec 3>/tmp/hold.$$
until grep -q "sessions open" /tmp/reg.out; do sleep 0.5; done
T1=$(date +%s.%N)
callgrind_control -d $VP >/dev/null
cat /tmp/reg.out; echo "window $(echo "$T1 - $T0" | bc) s"
exec 3>&-
wait $PY
callgrind_control -z $VP >/dev/null
sleep $(echo "$T1 - $T0" | bc)
callgrind_control -d $VP >/dev/null
kill -INT $VP $DP; wait
rm -f /tmp/hold.$$
rabbitmqctl delete_vhost $VH >/dev/null
ls -la $OUT.*
