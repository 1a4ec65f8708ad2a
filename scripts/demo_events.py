#!/usr/bin/env python3
"""The demos' helper: Stripe intents and their pending rows in --table (default payments).

The change stream is the table's own: its logical replication read by paystream (scripts/demo,
embedded mode) or by real Debezium on Kafka Connect (scripts/demo-kafka). Prints the new rows'
ids.
"""
import argparse, json, subprocess, urllib.request
from decimal import Decimal

ap = argparse.ArgumentParser()
for a in ("--stripe", "--run"):
    ap.add_argument(a, required=True)
ap.add_argument("--table", default="payments")
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


for name, card, amount in (("visa", "4242424242424242", "49.99"), ("declined", "4000000000000341", "15.00"),
                           ("3ds", "4000002760003184", "25.00")):
    pi = intent(card, int(Decimal(amount) * 100))
    key = f"{args.run}-{name}"
    print(psql(f"INSERT INTO {args.table} (idempotency_key, amount, currency, stripe_payment_intent_id) "
               f"VALUES ('{key}', {amount}, 'usd', '{pi}') RETURNING id"), flush=True)
