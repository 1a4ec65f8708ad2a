#!/usr/bin/env python3
"""paystream's wrapper around localstripe (a test tool only; GPL-3.0, never linked).

It changes three things and adds two:
- binds 127.0.0.1 only (localstripe itself binds every interface);
- keeps its store in memory (localstripe pickles everything to /tmp/localstripe.pickle after
  each write, which is slow and shared between instances);
- never loads another instance's data;
- fault injection for paystream's error paths: POST /_paystream/faults with JSON
  {"status": 429|500|503|..., "count": N, "delay_ms": M, "path": "/v1/payment_intents"}
  makes the next N matching requests wait delay_ms and/or answer `status` with a Stripe-shaped
  error body; DELETE /_paystream/faults clears them;
  Optional per fault: "should_retry": true|false adds a `Stripe-Should-Retry` header;
  "body": "<text>" answers that raw text (status defaults to 200) instead of a Stripe error;
  "drop": true closes the connection without an answer (the client sees a transport error);
- GET /_paystream/stats returns {"requests": N, "by_path": {...}, "max_per_second": M} counted
  over /v1/ requests (M: the most requests that started in any one-second window);
- GET /v1/payment_intents/search, which localstripe lacks, for the one query paystream sends:
  `metadata['idempotency_key']:'<key>'` (exact match; Stripe's own search lags, this one doesn't).
"""
import argparse
import asyncio
import collections
import json
import re
import time

from aiohttp import web

from localstripe import resources
from localstripe.server import app

# In memory only.
resources.Store.dump_to_disk = lambda self: None

FAULTS = []
STATS = {"requests": 0, "by_path": {}}
# Start times of recent /v1/ requests, for the highest rate seen in any one-second window.
RECENT = collections.deque()
MAX_PER_SECOND = [0]
SEARCH = re.compile(r"^metadata\['idempotency_key'\]:'((?:[^'\\]|\\.)*)'$")


@web.middleware
async def paystream_middleware(request, handler):
    path = request.path
    # Control endpoints are answered here, before localstripe's auth middleware.
    if path == "/_paystream/faults" and request.method == "POST":
        return await set_faults(request)
    if path == "/_paystream/faults" and request.method == "DELETE":
        return await clear_faults(request)
    if path == "/_paystream/stats":
        return await stats(request)
    if path.startswith("/v1/"):
        STATS["requests"] += 1
        key = request.method + " " + "/".join(path.split("/")[:3])
        STATS["by_path"][key] = STATS["by_path"].get(key, 0) + 1
        now = time.monotonic()
        RECENT.append(now)
        while RECENT and RECENT[0] <= now - 1.0:
            RECENT.popleft()
        MAX_PER_SECOND[0] = max(MAX_PER_SECOND[0], len(RECENT))
        for fault in FAULTS:
            if fault["count"] > 0 and path.startswith(fault.get("path", "/v1/")):
                fault["count"] -= 1
                if fault.get("delay_ms"):
                    await asyncio.sleep(fault["delay_ms"] / 1000)
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
                break
        if path == "/v1/payment_intents/search" and request.method == "GET":
            return search_intents(request)
    return await handler(request)


def search_intents(request):
    m = SEARCH.match(request.query.get("query", ""))
    if not m:
        body = {"error": {"type": "invalid_request_error",
                          "message": "this emulator searches metadata['idempotency_key'] only, "
                                     "not " + request.query_string}}
        return web.json_response(body, status=400)
    wanted = re.sub(r"\\(.)", r"\1", m.group(1))
    hits = [obj._export() for k, obj in list(resources.store.items())
            if k.startswith("payment_intent:")
            and (getattr(obj, "metadata", None) or {}).get("idempotency_key") == wanted]
    return web.json_response({"object": "search_result", "url": "/v1/payment_intents/search",
                              "has_more": False, "next_page": None, "data": hits})


async def set_faults(request):
    data = await request.json()
    items = data if isinstance(data, list) else [data]
    FAULTS.extend({"count": 1, **f} for f in items)
    return web.json_response({"faults": FAULTS})


async def clear_faults(request):
    FAULTS.clear()
    return web.json_response({"faults": FAULTS})


async def stats(request):
    return web.json_response({**STATS, "max_per_second": MAX_PER_SECOND[0]})


app.middlewares.insert(0, paystream_middleware)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=28420)
    args = ap.parse_args()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
