#!/bin/bash
# Runs once, when the master's data volume is first initialized (docker-entrypoint-initdb.d,
# after 10-payments.sql made the table): readies it for Debezium with the project's own
# scripts/prepare-postgres, and creates the role the streaming replicas clone and follow with.
set -euo pipefail
export PGUSER="$POSTGRES_USER" PGDATABASE="$POSTGRES_DB"
/opt/paystream/prepare-postgres --role debezium --table public.payments \
  --publication "${PUBLICATION_NAME:-paystream_payments}"
psql -X -v ON_ERROR_STOP=1 -qv pw="$REPLICATION_PASSWORD" <<<"CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'pw';"
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
