#!/usr/bin/env python3
"""Raw WebSocket collector for gateway integration tests.

ws_collect.py URL [--send TEXT]... [--count N] [--timeout SECS]
              [--stop-reading-after N] [--hold SECS]

Prints each received text message to stdout as "<recv_unix_time_us> <text>",
flushed per line. Exits 0 after --count messages (default: unlimited), or,
with --stop-reading-after N, after printing N messages and then holding the
connection open without reading for --hold seconds. Exits 1 if --timeout
passes before that (the hold is not counted), or if the connection fails or
is closed early.
"""
import argparse
import asyncio
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def describe_close(ws, exc=None):
    frame = exc.rcvd if exc is not None else ws.protocol.close_rcvd
    if frame is not None:
        return f"closed code={frame.code} reason={frame.reason!r}"
    return "closed code=1006 reason='no close frame received (abnormal closure)'"


async def receive(ws, args, limit):
    for text in args.send:
        await ws.send(text)
    n = 0
    while limit is None or n < limit:
        msg = await ws.recv()
        ts = time.time_ns() // 1000
        if isinstance(msg, bytes):
            log(f"{ts} <binary frame, {len(msg)} bytes, not counted>")
            continue
        sys.stdout.write(f"{ts} {msg}\n")
        sys.stdout.flush()
        n += 1


async def hold(ws, secs):
    """Do not read for `secs`, then report whether the server closed us.

    While we are not reading, websockets pauses the transport once its small
    frame queue is full, so it cannot notice a close during the hold. After
    the hold we drain what is buffered (without printing) to find out.
    """
    await asyncio.sleep(secs)
    drained = 0
    try:
        async with asyncio.timeout(2):
            while True:
                await ws.recv()
                drained += 1
    except ConnectionClosed as exc:
        log(f"{describe_close(ws, exc)} (detected after hold, drained {drained} buffered messages)")
    except TimeoutError:
        log(f"open: connection still open after hold (drained {drained} messages in 2s)")
    except OSError as exc:  # e.g. TCP reset by the server
        log(f"closed code=1006 reason={exc!r} (drained {drained} messages)")


async def main(args):
    stall = args.stop_reading_after is not None
    try:
        async with asyncio.timeout(args.timeout):
            ws = await connect(
                args.url,
                ping_interval=None,  # no client keepalive pings
                ping_timeout=None,
                compression=None,  # plain frames, like the Binance connector
                max_size=16 * 1024 * 1024,
                # Small receive queue: when we stop calling recv() the library
                # soon stops reading the socket, so the server sees real TCP
                # backpressure instead of an in-process buffer absorbing it.
                max_queue=16,
                close_timeout=2,
            )
            await receive(ws, args, args.stop_reading_after if stall else args.count)
    except TimeoutError:
        log(f"timeout: not done after {args.timeout}s")
        return 1
    except ConnectionClosed as exc:
        log(f"connection {describe_close(ws, exc)} before enough messages")
        return 1
    except (OSError, InvalidHandshake) as exc:
        log(f"connection failed: {exc!r}")
        return 1
    if stall:
        await hold(ws, args.hold)
    await ws.close()
    return 0


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--send", action="append", default=[], help="text to send right after connecting (repeatable)")
    p.add_argument("--count", type=int, default=None, help="exit 0 after N messages (default: unlimited)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up with exit 1 (default 30)")
    p.add_argument("--stop-reading-after", type=int, default=None, metavar="N",
                   help="after N messages stop reading, hold the connection --hold seconds, exit 0")
    p.add_argument("--hold", type=float, default=10.0, help="hold time for --stop-reading-after (default 10)")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
