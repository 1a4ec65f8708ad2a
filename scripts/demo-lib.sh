# The demos' shared end (source it): waits for the payments in table $1 with ids $2 to resolve,
# shows that the declined one stays pending, retries it with another card as the customer would,
# and shows the table once it succeeded. Needs PGHOST/PGPORT/PGUSER/PGDATABASE and STRIPE_BASE.

# demo_wait TABLE IDS N: until at most N of the payments are still pending (60 s at most).
demo_wait() {
  for _ in $(seq 1 60); do
    left=$(psql -Atc "SELECT count(*) FROM $1 WHERE id IN ($2) AND status = 'pending'")
    [ "$left" -le "$3" ] && return 0
    sleep 1
  done
}

demo_resolve() {
  demo_wait "$1" "$2" 2
  sleep 3  # another poll of the declined payment: still pending
  psql -c "SELECT id, idempotency_key, amount, status FROM $1 WHERE id IN ($2) ORDER BY id"
  echo "(the declined payment stays pending: Stripe lets the customer retry on the same intent)"
  local declined
  declined=$(psql -Atc "SELECT stripe_payment_intent_id FROM $1 WHERE id IN ($2) AND idempotency_key LIKE '%-declined'")
  echo "the customer retries $declined with another card..."
  curl -fsS -o /dev/null -H "Authorization: Bearer sk_test_paystream_dev" \
    "$STRIPE_BASE/v1/payment_intents/$declined/confirm" -d payment_method=pm_card_visa
  demo_wait "$1" "$2" 1
  psql -c "SELECT id, idempotency_key, amount, status, stripe_payment_intent_id FROM $1 WHERE id IN ($2) ORDER BY id"
  echo "(the 3-D Secure payment stays pending: Stripe has no final answer for it)"
}
