#!/usr/bin/env python3
"""Many WebSocket clients in one process, for the gateway's slow-client tests.

fleet.py URL --clients N --seconds S

Each client connects to URL (which should ask for `@trade` streams with timeUnit=MICROSECOND),
reads for S seconds, and checks that each symbol's trade ids arrive consecutively (no trade
lost). Prints one JSON object: clients, connected, messages, min/max messages per client, gaps
(trade ids skipped, all clients), and the latency (receive time - event time E) p50/p99 in µs.
"""
import argparse
import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect


async def client(url, seconds, out):
    stats = {"messages": 0, "gaps": 0, "lat": [], "connected": False}
    out.append(stats)
    last = {}
    try:
        async with connect(url, ping_interval=None, compression=None, max_size=16 * 1024 * 1024) as ws:
            stats["connected"] = True
            end = time.monotonic() + seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                now_us = time.time_ns() // 1000
                ev = json.loads(msg)
                ev = ev.get("data", ev)
                if ev.get("e") != "trade":
                    continue
                stats["messages"] += 1
                stats["lat"].append(now_us - ev["E"])
                sym, tid = ev["s"], ev["t"]
                if sym in last and tid != last[sym] + 1:
                    stats["gaps"] += abs(tid - last[sym] - 1)
                last[sym] = tid
    except Exception as e:  # a failed client is reported, not fatal
        print(f"client failed: {e!r}", file=sys.stderr)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(p / 100 * len(sorted_vals)))]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    a = ap.parse_args()
    out = []
    await asyncio.gather(*(client(a.url, a.seconds, out) for _ in range(a.clients)))
    lat = sorted(x for s in out for x in s["lat"])
    counts = [s["messages"] for s in out]
    print(json.dumps({
        "clients": a.clients,
        "connected": sum(1 for s in out if s["connected"]),
        "messages": sum(counts),
        "min_messages": min(counts),
        "max_messages": max(counts),
        "gaps": sum(s["gaps"] for s in out),
        "p50_us": pct(lat, 50),
        "p99_us": pct(lat, 99),
    }), flush=True)


asyncio.run(main())
