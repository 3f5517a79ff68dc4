#!/usr/bin/env python3
"""Drive the gateway with the official Binance connector (binance-connector).

binance_collect.py --url ws://127.0.0.1:PORT --symbol btcusdt [--interval 1m]...
                   [--trade] [--combined] --count N --timeout SECS

How binance-connector 3.13.0 talks to the server (from its source):
- SpotWebsocketStreamClient appends "/stream" to stream_url when
  is_combined=True, else "/ws" (no query string; "?timeUnit=..." only if
  time_unit is passed). Connecting happens synchronously in the constructor
  (websocket-client create_connection, no timeout, no compression offered,
  sends an "Origin: http://HOST:PORT" header).
- Every kline()/trade() call sends its own text frame
  {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": <int>}
  where id = int(time.time() * 1000), so calls in the same millisecond
  share an id.
- It never sends pings itself. Each server ping gets two pongs: one echoing
  the payload (websocket-client) and one with an empty payload (connector).
- stop() sends a close frame (1000) and joins the reader thread, which only
  ends when the server's close frame (or EOF) arrives; it can block forever,
  so it is called here with a bounded wait and the process ends via os._exit.

Prints every text message the handler receives, one per line, flushed.
Exits 0 after --count data events (subscription replies such as
{"result":null,"id":...} are printed but not counted); 1 on timeout, on
connect failure, or if the server closes the connection first.
"""
import argparse
import json
import logging
import os
import sys
import threading

from binance.websocket.spot.websocket_stream import SpotWebsocketStreamClient


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def finish(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_data_event(text):
    try:
        obj = json.loads(text)
    except ValueError:
        return True
    # {"result": ..., "id": ...} and {"error": {...}, "id": ...} are replies.
    return not (isinstance(obj, dict) and "id" in obj and ("result" in obj or "error" in obj))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL, e.g. ws://127.0.0.1:9443 (connector adds /ws or /stream)")
    p.add_argument("--symbol", required=True)
    p.add_argument("--interval", action="append", default=[], help="kline interval to subscribe (repeatable)")
    p.add_argument("--trade", action="store_true", help="also subscribe to <symbol>@trade")
    p.add_argument("--combined", action="store_true", help="is_combined=True (connect to /stream)")
    p.add_argument("--count", type=int, required=True, help="exit 0 after N data events")
    p.add_argument("--timeout", type=float, required=True, help="exit 1 if not done after SECS")
    args = p.parse_args()

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")

    done = threading.Event()
    received = 0

    def on_timeout():
        log(f"timeout: {received} of {args.count} data events after {args.timeout}s")
        finish(1)

    watchdog = threading.Timer(args.timeout, on_timeout)
    watchdog.daemon = True
    watchdog.start()

    def on_message(_, text):
        nonlocal received
        if done.is_set():
            return
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if is_data_event(text):
            received += 1
            if received >= args.count:
                done.set()

    def on_error(_, exc):
        log(f"connector error: {exc!r}")
        if not done.is_set():
            finish(1)

    def on_close(_):
        if not done.is_set():
            log("server closed the connection early")
            finish(1)

    try:
        client = SpotWebsocketStreamClient(
            stream_url=args.url, on_message=on_message, on_error=on_error,
            on_close=on_close, is_combined=args.combined,
        )
    except Exception as exc:
        log(f"connect failed: {exc!r}")
        finish(1)
    for iv in args.interval:
        client.kline(symbol=args.symbol, interval=iv)
    if args.trade:
        client.trade(symbol=args.symbol)

    done.wait()
    watchdog.cancel()
    stopper = threading.Thread(target=client.stop, daemon=True)
    stopper.start()
    stopper.join(3)
    if stopper.is_alive():
        log("client.stop() did not return within 3s (no close frame from server?)")
    finish(0)


if __name__ == "__main__":
    main()
