"""Captures what real Debezium writes for a scripted sequence of SQL, under each converter setting
paystream supports, into tests/golden/real/ (called by scripts/capture-golden, which prepares the
JVM side). For each setting: a fresh `payments` table in database `golden` of the dev Postgres,
three pending rows for the initial snapshot, Debezium's embedded engine (scripts/golden/Capture.java)
started, and once the snapshot is captured the streaming statements below. Writes:
- `<setting>.jsonl`: every record, `{"topic", "key", "value"}`, key and value as the exact text
  JsonConverter wrote (value null for a tombstone);
- `<setting>.properties`: the engine's settings (connection details and paths left out);
- `expected.json`: per setting, what each record on the table's topic must decode to, derived
  here from the SQL (not from the captures), so tests/golden.rs checks the decoder against the
  database, not against itself.
"""
import json, os, subprocess, sys, tempfile, time

ROOT, OUT, CLASSES, LIBS, PG_PORT = sys.argv[1:6]
PSQL = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", PG_PORT, "-U", "postgres"]
DDL = open(os.path.join(ROOT, "schemas/payments.sql")).read()

T0 = "'2026-12-01 10:00:00+00'"
def row(i, amount, currency, pi):
    pi = f"'{pi}'" if pi else "NULL"
    return f"({i}, 'golden-{i}', {amount}, '{currency}', 'pending', {pi}, {T0}, {T0})"
COLS = "(id, idempotency_key, amount, currency, status, stripe_payment_intent_id, created_at, updated_at)"

# Rows present before the engine starts: the initial snapshot reads them.
SNAPSHOT = [(1, "12.34", "usd", "pi_golden_1"), (2, "0.01", "usd", None), (3, "9999999999.99", "usd", "pi_golden_3")]
SETUP = f"""
DROP TABLE IF EXISTS public.payments;
DROP PUBLICATION IF EXISTS golden;
{DDL}
INSERT INTO public.payments {COLS} OVERRIDING SYSTEM VALUE VALUES {", ".join(row(*r) for r in SNAPSHOT)};
"""
# Streamed after the snapshot, one statement per transaction unless grouped.
STREAM = [
    f"INSERT INTO public.payments {COLS} OVERRIDING SYSTEM VALUE VALUES {row(4, '100.00', 'eur', 'pi_golden_4')}, "
    f"{row(5, '-5.50', 'usd', 'pi_golden_5')}, {row(6, '5.125', 'kwd', 'pi_golden_6')}",
    # REPLICA IDENTITY DEFAULT: an update has no before, a delete only the key (and fill values).
    "UPDATE public.payments SET status = 'succeeded', updated_at = '2026-12-01 10:05:00+00' WHERE id = 1",
    "DELETE FROM public.payments WHERE id = 2",
    "ALTER TABLE public.payments REPLICA IDENTITY FULL",
    # FULL: the whole old row in before.
    "UPDATE public.payments SET status = 'canceled', updated_at = '2026-12-01 10:06:00+00' WHERE id = 3",
    "DELETE FROM public.payments WHERE id = 4",
    # One transaction of several statements, with a transactional logical message.
    f"BEGIN; INSERT INTO public.payments {COLS} OVERRIDING SYSTEM VALUE VALUES {row(7, '50.00', 'usd', 'pi_golden_7')}; "
    "UPDATE public.payments SET status = 'failed', updated_at = '2026-12-01 10:07:00+00' WHERE id = 5; "
    "SELECT pg_logical_emit_message(true, 'golden', 'in a transaction'); COMMIT",
    "SELECT pg_logical_emit_message(false, 'golden', 'outside a transaction')",
    "TRUNCATE public.payments",
]
END = "SELECT pg_logical_emit_message(false, 'golden-end', '')"

def expected(unwrap):
    """What each record on the table's topic decodes to, in order, from the SQL above."""
    e = lambda op, i, amount=None, currency=None, status=None, before=None: dict(
        op=op, id=str(i), amount=amount, currency=currency, status=status, before=before)
    rows = [e("r", i, a, c, "pending") for i, a, c, _ in SNAPSHOT]
    rows += [e("c", 4, "100.00", "eur", "pending"), e("c", 5, "-5.50", "usd", "pending"),
             e("c", 6, "5.125", "kwd", "pending"),
             e("u", 1, "12.34", "usd", "succeeded"),
             # DEFAULT identity: the old row's key only, whatever Debezium filled in.
             e("d", 2, before="key"), dict(op="tombstone", id="2"),
             e("u", 3, "9999999999.99", "usd", "canceled", before="pending"),
             e("d", 4, before="pending"), dict(op="tombstone", id="4"),
             # The transaction runs under FULL identity too.
             e("c", 7, "50.00", "usd", "pending"), e("u", 5, "-5.50", "usd", "failed", before="pending"),
             dict(op="t", id=None)]
    if unwrap:
        # The 3.x unwrap SMT drops tombstones and the truncate record; an update is its new row
        # only; a rewritten delete keeps its old image (for DEFAULT identity the key and fill
        # values, which decode drops).
        rows = [r for r in rows if r["op"] not in ("tombstone", "t")]
        for r in rows:
            if r["op"] == "u":
                r["before"] = None
    return rows

BASE = {
    "name": "golden", "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
    "offset.flush.interval.ms": "1000",
    "plugin.name": "pgoutput", "topic.prefix": "payment", "table.include.list": "public.payments",
    "slot.name": "golden", "slot.drop.on.stop": "true", "publication.name": "golden",
    "publication.autocreate.mode": "filtered", "snapshot.mode": "initial",
    "skipped.operations": "none", "tombstones.on.delete": "true",
}
def setting(schemas, decimal, txmeta=False, unwrap=False):
    s = {"key.converter.schemas.enable": str(schemas).lower(),
         "value.converter.schemas.enable": str(schemas).lower(), "decimal.handling.mode": decimal}
    if txmeta:
        s |= {"provide.transaction.metadata": "true", "heartbeat.interval.ms": "500"}
    if unwrap:
        s |= {"transforms": "unwrap", "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
              "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
              "transforms.unwrap.add.fields": "op,table,lsn,source.ts_ms"}
    return s
SETTINGS = {
    "schema-precise-txmeta": setting(True, "precise", txmeta=True),
    "noschema-precise-txmeta": setting(False, "precise", txmeta=True),
    "schema-string": setting(True, "string"),
    "noschema-string": setting(False, "string"),
    "schema-double": setting(True, "double"),
    "noschema-double": setting(False, "double"),
    "unwrap-schema-precise": setting(True, "precise", unwrap=True),
    "unwrap-noschema-string": setting(False, "string", unwrap=True),
}

def psql(db, sql):
    subprocess.run(PSQL + ["-d", db, "-c", sql], check=True, stdout=subprocess.DEVNULL)

def records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.endswith("\n")]

def capture(name, extra):
    psql("postgres", "SELECT pg_drop_replication_slot('golden') FROM pg_replication_slots WHERE slot_name = 'golden'")
    psql("golden", SETUP)
    props = BASE | extra
    with tempfile.TemporaryDirectory() as tmp:
        conn = props | {"database.hostname": "127.0.0.1", "database.port": PG_PORT, "database.user": "postgres",
                        "database.password": "unused", "database.dbname": "golden", "capture.timeout.s": "180"}
        pf, raw = os.path.join(tmp, "engine.properties"), os.path.join(tmp, "records.jsonl")
        with open(pf, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in conn.items())
        log = open(os.path.join(OUT, f".{name}.log"), "w")
        jvm = subprocess.Popen(["java", "-Xmx512m", "-cp", f"{CLASSES}:{LIBS}/*", "Capture", pf, raw],
                               stdout=log, stderr=subprocess.STDOUT)
        data = f"{props['topic.prefix']}.public.payments"
        deadline = time.time() + 120
        while sum(r["topic"] == data for r in records(raw)) < len(SNAPSHOT):
            if jvm.poll() is not None or time.time() > deadline:
                sys.exit(f"{name}: the snapshot was not captured; see {log.name}")
            time.sleep(0.2)
        for sql in STREAM + [END]:
            psql("golden", sql)
        if jvm.wait(timeout=240) != 0:
            sys.exit(f"{name}: the engine failed; see {log.name}")
        got = records(raw)
    # Heartbeats come with the clock: keep the first, so captures differ only where Debezium does.
    beat, kept = False, []
    for r in got:
        if r["topic"].startswith("__debezium-heartbeat"):
            if beat:
                continue
            beat = True
        kept.append(r)
    with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    with open(os.path.join(OUT, f"{name}.properties"), "w") as f:
        f.write("# Debezium 3.6.3.Final embedded engine settings of this capture (scripts/capture-golden)\n")
        f.writelines(f"{k}={v}\n" for k, v in props.items())
    os.remove(log.name)
    print(f"{name}: {len(kept)} records", flush=True)

os.makedirs(OUT, exist_ok=True)
subprocess.run(PSQL + ["-d", "postgres", "-tc", "SELECT 1 FROM pg_database WHERE datname = 'golden'"],
               check=True, capture_output=True).stdout.strip() or psql("postgres", "CREATE DATABASE golden")
# `--expected-only`: rewrite expected.json from the SQL above, capturing nothing.
only = [] if sys.argv[6:] == ["--expected-only"] else sys.argv[6:] or list(SETTINGS)
for name in only:
    capture(name, SETTINGS[name])
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"data_topic": "payment.public.payments",
               "settings": {n: {"unwrap": "transforms" in s, "decimal": s["decimal.handling.mode"],
                                "rows": expected("transforms" in s)} for n, s in SETTINGS.items()}},
              f, indent=1)
    f.write("\n")
