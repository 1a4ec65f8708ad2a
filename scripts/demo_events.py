#!/usr/bin/env python3
"""The demos' helper: Stripe intents, pending rows, and (with --topic) the Debezium events for them.

With --topic (scripts/demo-kafka) it publishes exactly what Debezium's Postgres connector (JSON
converter, schemas off, precise decimals) writes for an insert, since Debezium itself cannot run
on this machine. Without it (scripts/demo, embedded mode) the rows' own logical replication is
the change stream. Prints the new rows' ids.
"""
import argparse, base64, json, subprocess, time, urllib.request
from decimal import Decimal

ap = argparse.ArgumentParser()
for a in ("--stripe", "--run"):
    ap.add_argument(a, required=True)
ap.add_argument("--brokers")
ap.add_argument("--topic")
args = ap.parse_args()
KEY = "Bearer sk_test_paystream_dev"


def stripe(path, form=None):
    data = "&".join(f"{k}={v}" for k, v in (form or {}).items()).encode() if form is not None else None
    req = urllib.request.Request(args.stripe + path, data=data, headers={"Authorization": KEY})
    try:
        return json.load(urllib.request.urlopen(req))
    except urllib.error.HTTPError as e:  # a decline answers 402; the intent holds the outcome
        return json.load(e)


def intent(card, amount):
    pm = stripe("/v1/payment_methods", {"type": "card", "card[number]": card, "card[exp_month]": 12,
                                        "card[exp_year]": 2034, "card[cvc]": 123})["id"]
    pi = stripe("/v1/payment_intents", {"amount": amount, "currency": "usd", "payment_method": pm})["id"]
    stripe(f"/v1/payment_intents/{pi}/confirm", {})
    return pi


def psql(sql):
    return subprocess.run(["psql", "-Atqc", sql], check=True, capture_output=True, text=True).stdout.strip()


def decimal_b64(amount):
    unscaled = int(Decimal(amount).scaleb(2))
    n = (unscaled.bit_length() + 8) // 8
    return base64.b64encode(unscaled.to_bytes(n, "big", signed=True)).decode()


producer = None
if args.topic:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    # Wait for the topics: a consumer that subscribes before its topic exists only sees it at
    # the next metadata refresh (minutes).
    for f in AdminClient({"bootstrap.servers": args.brokers}).create_topics(
            [NewTopic(t, 1, 1) for t in (args.topic, f"{args.run}-status", f"{args.run}-dlq")]).values():
        f.result(timeout=15)
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
for name, card, amount in (("visa", "4242424242424242", "49.99"), ("declined", "4000000000000341", "15.00"),
                           ("3ds", "4000002760003184", "25.00")):
    pi = intent(card, int(Decimal(amount) * 100))
    key = f"{args.run}-{name}"
    row = psql(f"INSERT INTO payments (idempotency_key, amount, currency, stripe_payment_intent_id) "
               f"VALUES ('{key}', {amount}, 'usd', '{pi}') RETURNING id, to_char(created_at AT TIME ZONE 'UTC', "
               f"'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    pid, created = row.split("|")
    print(pid, flush=True)
    if producer is None:
        continue
    after = {"id": int(pid), "idempotency_key": key, "amount": decimal_b64(amount), "currency": "usd",
             "status": "pending", "stripe_payment_intent_id": pi, "created_at": created, "updated_at": created}
    now_ms = int(time.time() * 1000)
    value = {"before": None, "after": after, "op": "c", "ts_ms": now_ms,
             "source": {"version": "3.0.0.Final", "connector": "postgresql", "name": "payment", "ts_ms": now_ms,
                        "snapshot": "false", "db": "payments", "schema": "public", "table": "payments"}}
    producer.produce(args.topic, key=json.dumps({"id": int(pid)}), value=json.dumps(value))
if producer is not None:
    producer.flush(10)
