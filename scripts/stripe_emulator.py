#!/usr/bin/env python3
"""paystream's wrapper around localstripe (a test tool only; GPL-3.0, never linked).

It changes four things about localstripe:
- binds 127.0.0.1 only (localstripe itself binds every interface);
- keeps its store in memory (localstripe pickles everything to /tmp/localstripe.pickle after
  each write, which is slow and shared between instances);
- never loads another instance's data;
- indexes its store by object type, so a list reads only its own type (localstripe scans every
  object for each list, which made a confirm cost grow with the store).

And adds, for paystream's tests:
- GET /v1/payment_intents/search, which localstripe lacks, for the one query paystream sends:
  `metadata['idempotency_key']:'<key>'` (exact match; Stripe's own search lags, this one doesn't).
- Fault injection: POST /_paystream/faults with a JSON fault or list of faults
  {"status": 429|500|503|..., "count": N, "delay_ms": M, "path": "/v1/payment_intents/pi_x",
   "key": "sk_test_..."} makes the next N matching requests (path prefix; only those made with
  that API key, when given) wait delay_ms and/or answer `status` with a Stripe-shaped error.
  Optional: "should_retry": true|false adds a `Stripe-Should-Retry` header; "body": "<text>"
  answers that raw text (status defaults to 200); "drop": true closes the connection without an
  answer. DELETE /_paystream/faults clears them all.
- POST /v1/payment_intents/{id}/cancel also records a `payment_intent.canceled` event, as Stripe
  does (localstripe records only succeeded and payment_failed), and takes Stripe's
  `cancellation_reason` (abandoned, duplicate, fraudulent, requested_by_customer), which the
  intent then shows (localstripe refuses the parameter).
- A declined intent can be retried as on Stripe: POST /v1/payment_intents/{id}/confirm with a
  `payment_method` makes a new attempt on the same intent (localstripe answers 500 "Not
  implemented" to a confirm with a payment method, and refuses any confirm after a decline).
  That is what Stripe's own lifecycle promises: a decline returns the intent to
  `requires_payment_method` so the customer can try again.
- GET /v1/events lists as Stripe does: newest first, `types[]` (several types in one call, as
  `types[]=a` or `types[0]=a`) or `type`, `created` (an exact value or `created[gt|gte|lt|lte]`),
  `limit` (1-100, default 10), `starting_after` / `ending_before` (localstripe lists oldest
  first and knows neither `types[]` nor `ending_before`). paystream's events-feed cursor relies
  on the newest-first order; the old order hid a bug that skipped events.
- Intents carry `amount_received` (what was captured: the amount once succeeded, the captured
  part after a partial capture of a `capture_method=manual` intent, 0 before) and
  `amount_capturable` (the authorized amount while `requires_capture`), which localstripe
  lacks and paystream checks before it writes `succeeded`.
- Bulk, for benchmarks and the events-feed tests (HTTP would take 18 ms an intent):
  POST /_paystream/bulk_intents {"n": N, "amount": 1000, "card": "4242…", "key_prefix": "k-"}
  creates N intents with a card attached, not confirmed (`requires_confirmation`, pending to
  paystream), metadata idempotency_key = key_prefix + i, and answers {"ids": [...]};
  POST /_paystream/bulk_confirm {"ids": [...]} confirms them (each records its event) and
  answers {"confirmed": n, "at": <emulator time>}.
- Stripe Connect: a request with `Stripe-Account: acct_…` acts on that connected account.
  PaymentIntents created in an account belong to it; a retrieve, cancel, confirm, capture,
  search or events list sees only the objects of its own account (the platform's when the
  header is absent), as on Stripe; another account's intent is a 404.
- Restricted keys (`rk_test_…`, `rk_live_…`) are accepted like secret keys; one whose name
  contains `_read_` is read-only, as a restricted key with only read permissions is on Stripe:
  every POST under /v1/ answers 403 `permission_error` (localstripe checks no permission).
- Stripe's limits and lags, per API key: POST /_paystream/config {"key": "sk_…",
  "rate_limit_rps": N, "search_lag_ms": M}. With a rate limit, that key's requests beyond N in
  any one second answer 429 `rate_limit` with `Stripe-Should-Retry: true`, as Stripe does; with
  a search lag, Search does not find an intent until M ms after it was created (Stripe's Search
  is eventually consistent: usually under a minute). Omitted values are off.
- Stats: GET /_paystream/stats returns {"requests", "by_path", "max_per_second"} over all /v1/
  requests; with ?key=sk_... only that key's: its "max_per_second" (the most requests that
  started in any one-second window) and "log", every request as [t_seconds, method, path,
  status]. Tests give each daemon its own key, so parallel tests never mix.

Where it still differs from Stripe (none of it is something paystream's tests rely on):
- Search understands only `metadata['idempotency_key']:'…'`, exactly.
- Events: only payment_intent.succeeded, .payment_failed and .canceled are recorded; no
  `pending_webhooks`; `data.object` is rendered in one API version.
- `last_payment_error` has no `type` or `decline_code`; a decline's 402 says
  `invalid_request_error` where Stripe says `card_error`.
- The `Idempotency-Key` header is ignored: a repeated POST acts again.
- Connect: only PaymentIntents (and their events) belong to an account; payment methods are
  shared.
- Restricted keys are read-only by name (`_read_`), not by per-resource permission.
- The rate limit is one per key, not per endpoint.
- A partial capture refunds the rest (localstripe) instead of releasing it; `amount_received`
  is right either way.
- Three-decimal currencies' last-digit-0 rule and minimum amounts are not enforced.
"""
import argparse
import asyncio
import collections
import contextvars
import re
import time

from aiohttp import web

from localstripe import resources
from localstripe.errors import UserError

# Stripe's behaviour where localstripe differs and paystream depends on it. These replace
# localstripe's handlers in its `extra_apis` list, so they must run before its server module is
# imported: that import binds the list's functions to routes.
PI = resources.PaymentIntent
_init_orig = PI.__init__
_retrieve_orig = PI._api_retrieve.__func__
# The connected account of the request being served (`Stripe-Account`), None for the platform.
ACCOUNT = contextvars.ContextVar("account", default=None)


def pi_init(self, *args, **kwargs):
    _init_orig(self, *args, **kwargs)
    CREATED_AT[self.id] = time.monotonic()
    self._account = ACCOUNT.get()


def pi_retrieve(cls, id):
    obj = _retrieve_orig(cls, id)
    if getattr(obj, "_account", None) != ACCOUNT.get():
        raise UserError(404, "No such payment_intent: '" + id + "'")
    return obj


PI.__init__ = pi_init
PI._api_retrieve = classmethod(pi_retrieve)
_event_init_orig = resources.Event.__init__


def event_init(self, type, data):
    _event_init_orig(self, type, data)
    self._account = getattr(data, "_account", None)


resources.Event.__init__ = event_init
_confirm_orig = PI._api_confirm
_cancel_orig = PI._api_cancel
_capture_orig = PI._api_capture
CANCELLATION_REASONS = ("abandoned", "duplicate", "fraudulent", "requested_by_customer")


def pi_confirm(id, payment_method=None, **kwargs):
    if payment_method is None:
        return _confirm_orig(id, **kwargs)
    obj = PI._api_retrieve(id)
    if obj.status not in ("requires_payment_method", "requires_confirmation", "requires_action"):
        raise UserError(400, "You cannot confirm this PaymentIntent because it has a status of "
                        + obj.status)
    resources.PaymentMethod._api_retrieve(payment_method)  # 404 for an unknown one
    # A new attempt on the same intent: the failed charge stays in the store, as on Stripe.
    obj.payment_method = payment_method
    obj.latest_charge = None
    obj.next_action = None
    obj._authentication_failed = False
    obj._confirm(on_failure_now=obj._report_failure)
    return obj


def pi_cancel(id, cancellation_reason=None, **kwargs):
    if cancellation_reason is not None and cancellation_reason not in CANCELLATION_REASONS:
        raise UserError(400, "Invalid cancellation_reason: " + str(cancellation_reason))
    obj = _cancel_orig(id, **kwargs)
    obj._cancellation_reason = cancellation_reason
    # Stripe records payment_intent.canceled; localstripe does not.
    resources.Event("payment_intent.canceled", obj)
    return obj


def pi_capture(id, amount_to_capture=None, **kwargs):
    obj = _capture_orig(id, amount_to_capture=amount_to_capture, **kwargs)
    if amount_to_capture is not None:
        obj._amount_captured = int(amount_to_capture)
    return obj


def pi_amount_received(self):
    if self.status != "succeeded" or self.latest_charge is None:
        return 0
    return getattr(self, "_amount_captured", None) or self.latest_charge.amount


PI.amount_received = property(pi_amount_received)
PI.amount_capturable = property(
    lambda self: self.latest_charge.amount if self.status == "requires_capture" else 0)
PI.cancellation_reason = property(lambda self: getattr(self, "_cancellation_reason", None))
for i, (method, url, func) in enumerate(resources.extra_apis):
    replacement = {"/v1/payment_intents/{id}/confirm": pi_confirm,
                   "/v1/payment_intents/{id}/cancel": pi_cancel,
                   "/v1/payment_intents/{id}/capture": pi_capture}.get(url)
    if replacement:
        resources.extra_apis[i] = (method, url, replacement)

from localstripe.server import app  # noqa: E402 (after the handlers above are in place)

# In memory only.
resources.Store.dump_to_disk = lambda self: None

# Lists read only their own object type. localstripe scans the whole store for every list, and
# an intent's export lists several things, so at 100,000 intents a confirm took 17 ms and
# grew with the store; the feed benchmark needs a store that size.
BY_TYPE = collections.defaultdict(dict)  # object type -> {store key: None}, insertion order


def _store_set(self, key, value):
    dict.__setitem__(self, key, value)
    BY_TYPE[key.split(":", 1)[0]][key] = None


def _store_del(self, key):
    dict.__delitem__(self, key)
    BY_TYPE[key.split(":", 1)[0]].pop(key, None)


resources.Store.__setitem__ = _store_set
resources.Store.__delitem__ = _store_del


def _list_all(cls, url, limit=None, starting_after=None, **kwargs):
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    li = resources.List(url, limit=limit, starting_after=starting_after)
    li._list = [resources.store[k] for k in BY_TYPE[cls.object]]
    return li


resources.StripeObject._api_list_all = classmethod(_list_all)

FAULTS = []
# Per API key: {"rate_limit_rps": N, "search_lag_ms": M} (see the module doc).
CONFIG = collections.defaultdict(dict)
CREATED_AT = {}  # intent id -> monotonic time of its creation (for the search lag)
SEARCH = re.compile(r"^metadata\['idempotency_key'\]:'((?:[^'\\]|\\.)*)'$")


class Meter:
    """Requests of one scope (all, or one API key): counts, peak rate, and a log."""

    def __init__(self, keep_log):
        self.requests = 0
        self.by_path = {}
        self.recent = collections.deque()
        self.max_per_second = 0
        self.log = [] if keep_log else None

    def start(self, method, path):
        self.requests += 1
        group = method + " " + "/".join(path.split("/")[:3])
        self.by_path[group] = self.by_path.get(group, 0) + 1
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        self.max_per_second = max(self.max_per_second, len(self.recent))
        return now

    def done(self, started, method, path, status):
        if self.log is not None:
            self.log.append([round(started, 4), method, path, status])

    def json(self):
        out = {"requests": self.requests, "by_path": self.by_path,
               "max_per_second": self.max_per_second}
        if self.log is not None:
            out["log"] = self.log
        return out


ALL = Meter(keep_log=False)
BY_KEY = collections.defaultdict(lambda: Meter(keep_log=True))


def api_key(request):
    auth = request.headers.get("Authorization", "")
    return auth[len("Bearer "):] if auth.startswith("Bearer ") else ""


def injected(fault, request):
    """The response a fault prescribes, or None to let the request through (delay only)."""
    if fault.get("drop"):
        request.transport.abort()
        return web.Response(status=500)
    headers = {}
    if "should_retry" in fault:
        headers["Stripe-Should-Retry"] = "true" if fault["should_retry"] else "false"
    if "body" in fault:
        return web.Response(text=fault["body"], status=fault.get("status", 200),
                            content_type="application/json", headers=headers)
    status = fault.get("status")
    if status:
        kind = "invalid_request_error" if status < 500 else "api_error"
        body = {"error": {"type": kind, "message": "injected by paystream's emulator",
                          "code": "rate_limit" if status == 429 else None}}
        return web.json_response(body, status=status, headers=headers)
    return None


@web.middleware
async def paystream_middleware(request, handler):
    path = request.path
    # Set for every request (a keep-alive connection serves its requests in one task).
    ACCOUNT.set(request.headers.get("Stripe-Account"))
    # Control endpoints are answered here, before localstripe's auth middleware.
    if path == "/_paystream/faults" and request.method == "POST":
        data = await request.json()
        FAULTS.extend({"count": 1, **f} for f in (data if isinstance(data, list) else [data]))
        return web.json_response({"faults": FAULTS})
    if path == "/_paystream/faults" and request.method == "DELETE":
        FAULTS.clear()
        return web.json_response({"faults": FAULTS})
    if path == "/_paystream/config" and request.method == "POST":
        data = await request.json()
        CONFIG[data.pop("key", "")].update(data)
        return web.json_response(dict(CONFIG))
    if path == "/_paystream/bulk_intents" and request.method == "POST":
        return bulk_intents(await request.json())
    if path == "/_paystream/bulk_confirm" and request.method == "POST":
        return bulk_confirm(await request.json())
    if path == "/_paystream/stats":
        key = request.query.get("key")
        return web.json_response((BY_KEY[key] if key else ALL).json())
    if not path.startswith("/v1/"):
        return await handler(request)

    key = api_key(request)
    meters = [ALL, BY_KEY[key]]
    started = [m.start(request.method, path) for m in meters]
    response = None
    limit = CONFIG[key].get("rate_limit_rps")
    if limit is not None and len(BY_KEY[key].recent) > limit:
        response = web.json_response(
            {"error": {"type": "invalid_request_error", "code": "rate_limit",
                       "message": "Too many requests hit the API too quickly."}},
            status=429, headers={"Stripe-Should-Retry": "true"})
    if response is None and key.startswith("rk_") and "_read_" in key and request.method == "POST":
        response = web.json_response({"error": {
            "type": "invalid_request_error", "code": "permission_error",
            "message": f"The provided key '{key[:12]}…' does not have the required permissions "
                       "for this endpoint (rak_payment_intent_write)."}}, status=403)
    for fault in FAULTS if response is None else ():
        if (fault["count"] > 0 and path.startswith(fault.get("path", "/v1/"))
                and fault.get("key", key) == key):
            fault["count"] -= 1
            if fault.get("delay_ms"):
                await asyncio.sleep(fault["delay_ms"] / 1000)
            response = injected(fault, request)
            break
    if response is None and path == "/v1/payment_intents/search" and request.method == "GET":
        response = search_intents(request, CONFIG[key].get("search_lag_ms", 0) / 1000)
    if response is None and path == "/v1/events" and request.method == "GET":
        response = list_events(request)
    if response is None and key.startswith("rk_"):
        # localstripe knows only secret keys: hand it the request as a secret key's.
        headers = dict(request.headers)
        headers["Authorization"] = "Bearer sk_" + key[len("rk_"):]
        request = request.clone(headers=headers)
    if response is None:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            response = e
    for m, t in zip(meters, started):
        m.done(t, request.method, path, response.status)
    return response


def search_intents(request, lag_s):
    m = SEARCH.match(request.query.get("query", ""))
    if not m:
        body = {"error": {"type": "invalid_request_error",
                          "message": "this emulator searches metadata['idempotency_key'] only, "
                                     "not " + request.query_string}}
        return web.json_response(body, status=400)
    wanted = re.sub(r"\\(.)", r"\1", m.group(1))
    visible_before = time.monotonic() - lag_s
    account = ACCOUNT.get()
    hits = [obj._export() for k, obj in list(resources.store.items())
            if k.startswith("payment_intent:") and getattr(obj, "_account", None) == account
            and (getattr(obj, "metadata", None) or {}).get("idempotency_key") == wanted
            and CREATED_AT.get(obj.id, 0) <= visible_before]
    return web.json_response({"object": "search_result", "url": "/v1/payment_intents/search",
                              "has_more": False, "next_page": None, "data": hits})


EVENT_PARAMS = re.compile(r"^(type|types\[\d*\]|created|created\[(gt|gte|lt|lte)\]|limit|"
                          r"starting_after|ending_before)$")


def list_events(request):
    def bad(message):
        return web.json_response({"error": {"type": "invalid_request_error", "message": message}},
                                 status=400)
    q = request.query
    unknown = [k for k in q.keys() if not EVENT_PARAMS.match(k)]
    if unknown:
        return bad("Received unknown parameter: " + unknown[0])
    types = [v for k, v in q.items() if k.startswith("types[")]
    if "type" in q and types:
        return bad("You may pass either type or types, but not both.")
    if "type" in q:
        types = [q["type"]]
    if "starting_after" in q and "ending_before" in q:
        return bad("You may pass only one of starting_after and ending_before.")
    try:
        limit = int(q.get("limit", 10))
        bounds = [(op, int(q[f"created[{op}]"])) for op in ("gt", "gte", "lt", "lte")
                  if f"created[{op}]" in q]
        if "created" in q:
            bounds.append(("eq", int(q["created"])))
    except ValueError:
        return bad("Invalid integer in limit or created")
    if not 1 <= limit <= 100:
        return bad("limit must be between 1 and 100")
    test = {"gt": lambda c, v: c > v, "gte": lambda c, v: c >= v, "lt": lambda c, v: c < v,
            "lte": lambda c, v: c <= v, "eq": lambda c, v: c == v}
    # The store keeps events in creation order: reversed, newest first, as Stripe lists.
    account = ACCOUNT.get()
    evs = [e for e in (resources.store[k] for k in reversed(list(BY_TYPE["event"])))
           if getattr(e, "_account", None) == account and (not types or e.type in types) and all(test[op](e.created, v) for op, v in bounds)]
    ids = [e.id for e in evs]
    cursor = q.get("starting_after") or q.get("ending_before")
    if cursor is not None and cursor not in ids:
        return bad("No such event: " + cursor)
    if "starting_after" in q:
        start = ids.index(cursor) + 1
        page, has_more = evs[start:start + limit], len(evs) > start + limit
    elif "ending_before" in q:
        end = ids.index(cursor)
        page, has_more = evs[max(0, end - limit):end], end - limit > 0
    else:
        page, has_more = evs[:limit], len(evs) > limit
    return web.json_response({"object": "list", "url": "/v1/events", "has_more": has_more,
                              "data": [e._export() for e in page]})


def bulk_intents(data):
    card = {"number": data.get("card", "4242424242424242"), "exp_month": 12, "exp_year": 2034,
            "cvc": "123"}
    pm = resources.PaymentMethod._api_create(type="card", card=card)
    prefix = data.get("key_prefix", "bulk-")
    ids = [resources.PaymentIntent._api_create(
               amount=int(data.get("amount", 1000)), currency="usd", payment_method=pm.id,
               metadata={"idempotency_key": f"{prefix}{i}"}).id
           for i in range(int(data["n"]))]
    return web.json_response({"ids": ids})


def bulk_confirm(data):
    for i in data["ids"]:
        try:
            resources.PaymentIntent._api_confirm(i)
        except UserError:
            pass  # a decline answers 402, as over HTTP; the intent holds the outcome
    return web.json_response({"confirmed": len(data["ids"]), "at": time.monotonic()})


app.middlewares.insert(0, paystream_middleware)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=28420)
    args = ap.parse_args()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
