#!/bin/bash
# A streaming replica of the master: on first start, clone it with pg_basebackup -R (which
# writes standby.signal and primary_conninfo) into its own physical slot, then run as a hot
# standby. Later starts find the data and just run.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  until gosu postgres env PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
      -h postgres -U replicator -D "$PGDATA" -R -X stream -C -S "$REPLICA_SLOT"; do
    echo "replica: waiting for the master"
    rm -rf "${PGDATA:?}"/*
    sleep 2
  done
fi
exec docker-entrypoint.sh postgres -c hot_standby=on
