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
- GET /_paystream/stats returns {"requests": N, "by_path": {...}} counted over /v1/ requests.
"""
import argparse
import asyncio
import json

from aiohttp import web

from localstripe import resources
from localstripe.server import app

# In memory only.
resources.Store.dump_to_disk = lambda self: None

FAULTS = []
STATS = {"requests": 0, "by_path": {}}


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
        for fault in FAULTS:
            if fault["count"] > 0 and path.startswith(fault.get("path", "/v1/")):
                fault["count"] -= 1
                if fault.get("delay_ms"):
                    await asyncio.sleep(fault["delay_ms"] / 1000)
                status = fault.get("status")
                if status:
                    kind = "invalid_request_error" if status < 500 else "api_error"
                    body = {"error": {"type": kind, "message": "injected by paystream's emulator",
                                      "code": "rate_limit" if status == 429 else None}}
                    return web.json_response(body, status=status)
                break
    return await handler(request)


async def set_faults(request):
    data = await request.json()
    items = data if isinstance(data, list) else [data]
    FAULTS.extend({"count": 1, **f} for f in items)
    return web.json_response({"faults": FAULTS})


async def clear_faults(request):
    FAULTS.clear()
    return web.json_response({"faults": FAULTS})


async def stats(request):
    return web.json_response(STATS)


app.middlewares.insert(0, paystream_middleware)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=58420)
    args = ap.parse_args()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
