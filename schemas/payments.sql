-- The payments table as the payment service creates it. Idempotent.
CREATE TABLE IF NOT EXISTS public.payments (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  idempotency_key TEXT NOT NULL UNIQUE,
  -- Exact, in the currency's major unit, up to three decimals: Stripe's three-decimal
  -- currencies (BHD, JOD, KWD, OMR, TND) need them. Unconstrained NUMERIC keeps the scale each
  -- amount was written with (12.50 stays 12.50). Debezium carries it as VariableScaleDecimal,
  -- which drops trailing zeros when streaming (12.50 arrives as 12.5: the same amount).
  amount NUMERIC NOT NULL CHECK (scale(amount) <= 3),
  currency TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',
  stripe_payment_intent_id TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
