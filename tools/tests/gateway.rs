//! End-to-end tests of `mdbus gateway`: real broker, gateway and client processes; clients from
//! elsewhere (Python `websockets`, Binance's own connector) and a plain WebSocket client.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Client = WebSocket<MaybeTlsStream<TcpStream>>;

fn broker(bus: &str, rate: &str, wait: &str) -> Proc {
    Proc::spawn("broker", &["broker", "--bus", bus, "--symbols", "3", "--rate", rate, "--wait-subscribers", wait])
}

/// Every frame of BTCUSDT the bus published, by seq (from `mdbus tail`, stopped by `stop`).
fn tail_frames(tail: Proc, rx: std::sync::mpsc::Receiver<String>) -> HashMap<u64, Value> {
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "tail failed: {err}");
    let mut m = HashMap::new();
    for line in rx.try_iter() {
        let v: Value = serde_json::from_str(&line).unwrap();
        m.insert(v["seq"].as_u64().unwrap(), v);
    }
    m
}

/// Checks one Binance event against the frame the bus published.
fn check_event(ev: &Value, frame: &Value, micros: bool) {
    let scale = |ms: &Value, end: bool| {
        let ms = ms.as_i64().unwrap();
        if micros {
            ms * 1000 + if end { 999 } else { 0 }
        } else {
            ms
        }
    };
    assert_eq!(ev["s"], frame["s"], "{ev} vs {frame}");
    let e = ev["E"].as_i64().unwrap();
    let fe = frame["E"].as_i64().unwrap();
    if micros {
        assert_eq!(e / 1000, fe, "E {ev} vs {frame}");
    } else {
        assert_eq!(e, fe, "E {ev} vs {frame}");
    }
    match ev["e"].as_str().unwrap() {
        "kline" => {
            assert_eq!(frame["kind"], "kline");
            let (k, fk) = (&ev["k"], &frame["k"]);
            for f in ["s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"] {
                assert_eq!(k[f], fk[f], "field {f}: {ev} vs {frame}");
            }
            assert_eq!(k["t"].as_i64().unwrap(), scale(&fk["t"], false), "t: {ev} vs {frame}");
            assert_eq!(k["T"].as_i64().unwrap(), scale(&fk["T"], true), "T: {ev} vs {frame}");
            assert!(k["o"].is_string() && k["v"].is_string(), "decimals are strings: {ev}");
        }
        "trade" => {
            assert_eq!(frame["kind"], "trade");
            for f in ["t", "p", "q", "m"] {
                assert_eq!(ev[f], frame[f], "field {f}: {ev} vs {frame}");
            }
            let t = ev["T"].as_i64().unwrap();
            assert_eq!(if micros { t / 1000 } else { t }, frame["T"].as_i64().unwrap(), "T: {ev} vs {frame}");
            assert_eq!(ev["M"], true);
        }
        other => panic!("unexpected event {other}: {ev}"),
    }
}

fn py_output(mut cmd: Command, what: &str) -> Vec<String> {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// `ws_collect.py` lines are `<recv µs> <message>`.
fn ws_collect_messages(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn python_clients_receive_what_the_bus_published() {
    let bus = unique_bus("gwpy");
    let py = python();
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--symbol", "BTCUSDT"]);
    let tail_rx = tail.lines();
    let broker = broker(&bus, "300", "2");
    let gw = Gateway::start(&bus, &[]);

    let mut raw = Command::new(&py);
    raw.arg(py_script("ws_collect.py"))
        .arg(gw.url("/stream?streams=btcusdt@kline_1m/btcusdt@kline_1s/btcusdt@trade&timeUnit=MICROSECOND"))
        .args(["--count", "300", "--timeout", "60"]);
    let mut official = Command::new(&py);
    official
        .arg(py_script("binance_collect.py"))
        .args(["--url", &gw.url(""), "--symbol", "btcusdt", "--interval", "1m", "--interval", "1s", "--trade"])
        .args(["--count", "300", "--timeout", "60"]);
    let official = std::thread::spawn(move || py_output(official, "binance connector client"));
    let raw = ws_collect_messages(&py_output(raw, "websockets client"));
    let official = official.join().unwrap();

    // The REST shim the connector's users call first.
    let (st, body) = gw.get("/api/v3/exchangeInfo");
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = info["symbols"].as_array().unwrap().iter().map(|s| s["symbol"].as_str().unwrap()).collect();
    assert!(names.contains(&"BTCUSDT"), "{names:?}");
    let (st, body) = gw.get("/api/v3/ping");
    assert_eq!((st, body.as_str()), (200, "{}"));
    let (st, body) = gw.get("/api/v3/time");
    assert_eq!(st, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["serverTime"].as_i64().unwrap() > 1_600_000_000_000);

    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "gateway: {err}");
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "broker: {err}");
    let frames = tail_frames(tail, tail_rx);

    // Raw websockets client, combined stream, microseconds.
    assert_eq!(raw.len(), 300);
    let mut kinds = HashMap::new();
    for m in &raw {
        let seq = m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}"));
        let data = &m["data"];
        let frame = frames.get(&seq).unwrap_or_else(|| panic!("seq {seq} was not published for BTCUSDT: {m}"));
        check_event(data, frame, true);
        let stream = match data["e"].as_str().unwrap() {
            "kline" => format!("btcusdt@kline_{}", data["k"]["i"].as_str().unwrap()),
            _ => "btcusdt@trade".to_string(),
        };
        assert_eq!(m["stream"], stream.as_str());
        *kinds.entry(stream).or_insert(0) += 1;
    }
    assert_eq!(kinds.len(), 3, "all three streams arrived: {kinds:?}");

    // The official connector: raw events with our seq inside.
    let mut events = 0;
    for line in &official {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v.get("result").is_some() {
            assert_eq!(v["result"], Value::Null, "{v}");
            continue;
        }
        let seq = v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {v}"));
        check_event(&v, frames.get(&seq).unwrap_or_else(|| panic!("seq {seq} not published: {v}")), false);
        events += 1;
    }
    assert_eq!(events, 300);
    forget_bus(&bus);
}

#[test]
fn resume_from_seq_gets_every_frame_once() {
    let bus = unique_bus("gwres");
    let py = python();
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--symbol", "BTCUSDT"]);
    let tail_rx = tail.lines();
    let broker = broker(&bus, "300", "2");
    let gw = Gateway::start(&bus, &[]);
    let streams = "btcusdt@trade/btcusdt@kline_1m";

    // From the very start of the log, then away, then back from where it left off.
    let collect = |from: u64| {
        let mut c = Command::new(&py);
        c.arg(py_script("ws_collect.py")).arg(gw.url(&format!("/stream?streams={streams}&fromSeq={from}"))).args([
            "--count",
            "400",
            "--timeout",
            "60",
        ]);
        ws_collect_messages(&py_output(c, "resuming client"))
    };
    // fromSeq=0: "from the beginning" (seqs start at 1).
    let first = collect(0);
    let last = first.last().unwrap()["seq"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let second = collect(last + 1);
    let stats = gw.stats();
    assert_eq!(stats["resumes"], 2, "{stats}");
    assert!(stats["resumed_frames"].as_u64().unwrap() > 0, "the log supplied frames: {stats}");

    let (ok, _) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok);
    let (ok, _) = broker.stop(Duration::from_secs(10));
    assert!(ok);
    let frames = tail_frames(tail, tail_rx);

    let got: Vec<u64> = first.iter().chain(&second).map(|m| m["seq"].as_u64().unwrap()).collect();
    let end = *got.last().unwrap();
    let mut want: Vec<u64> = frames
        .iter()
        .filter(|(&s, f)| s <= end && (f["kind"] == "trade" || (f["kind"] == "kline" && f["k"]["i"] == "1m")))
        .map(|(&s, _)| s)
        .collect();
    want.sort_unstable();
    assert_eq!(got.len(), want.len(), "every frame once: got {} want {}", got.len(), want.len());
    assert_eq!(got, want, "every frame once, in order");
    for m in first.iter().chain(&second) {
        check_event(&m["data"], &frames[&m["seq"].as_u64().unwrap()], false);
    }
    forget_bus(&bus);
}

fn connect(url: &str) -> Client {
    let (ws, _) = tungstenite::connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    ws
}

fn send(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

/// The next text message, as JSON.
fn next_json(ws: &mut Client) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// The next reply or error (skipping data messages).
fn reply(ws: &mut Client) -> Value {
    loop {
        let v = next_json(ws);
        if v.get("id").is_some() {
            return v;
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
fn close_frame(ws: &mut Client) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (0, String::new()),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

#[test]
fn requests_replies_and_errors_follow_binance() {
    let bus = unique_bus("gwproto");
    let broker = broker(&bus, "500", "1");
    let gw = Gateway::start(&bus, &["--max-msg-rate", "1000"]);
    let mut ws = connect(&gw.url("/ws"));

    send(&mut ws, r#"{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": null, "id": 1}));
    send(&mut ws, r#"{"method": "LIST_SUBSCRIPTIONS", "id": "abc-1"}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": ["btcusdt@trade"], "id": "abc-1"}));
    send(&mut ws, r#"{"method":"GET_PROPERTY","params":["combined"],"id":null}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": false, "id": null}));
    // Raw events, with our seq.
    let ev = next_json(&mut ws);
    assert_eq!((ev["e"].as_str(), ev["s"].as_str()), (Some("trade"), Some("BTCUSDT")), "{ev}");
    assert!(ev["seq"].is_u64() && ev.get("stream").is_none(), "{ev}");

    send(&mut ws, r#"{"method":"SET_PROPERTY","params":["combined",true],"id":2}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": null, "id": 2}));
    let mut combined = None;
    for _ in 0..200 {
        let v = next_json(&mut ws);
        if v.get("stream").is_some() {
            combined = Some(v);
            break;
        }
    }
    let v = combined.expect("combined events after SET_PROPERTY");
    assert_eq!(v["stream"], "btcusdt@trade");
    assert_eq!(v["data"]["e"], "trade");
    assert!(v["seq"].is_u64());

    // Garbage gets an error; the connection stays.
    send(&mut ws, "{oops");
    let e = reply(&mut ws);
    assert_eq!(e["error"]["code"], 3, "{e}");
    assert!(e["error"]["msg"].as_str().unwrap().starts_with("Invalid JSON"), "{e}");
    send(&mut ws, r#"{"method":"FOO","id":5}"#);
    let e = reply(&mut ws);
    assert_eq!((e["error"]["code"].as_i64(), e["id"].as_i64()), (Some(2), Some(5)), "{e}");
    send(&mut ws, r#"{"method":"SUBSCRIBE","params":["btcusdt@kline_7m"],"id":6}"#);
    let e = reply(&mut ws);
    assert_eq!((e["error"]["code"].as_i64(), e["id"].as_i64()), (Some(2), Some(6)), "{e}");
    send(&mut ws, r#"{"method":"SET_PROPERTY","params":["combined","yes"],"id":"x"}"#);
    let e = reply(&mut ws);
    assert_eq!((e["error"]["code"].as_i64(), e["id"].as_str()), (Some(1), Some("x")), "{e}");
    send(&mut ws, r#"{"method":"GET_PROPERTY","params":["colour"],"id":9}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"error": {"code": 0, "msg": "Unknown property"}, "id": 9}));
    ws.send(Message::binary(vec![0u8, 159, 146, 150])).unwrap();
    assert_eq!(reply(&mut ws)["error"]["code"], 3);
    ws.send(Message::Ping(b"hi".to_vec().into())).unwrap();
    let mut pong = false;
    for _ in 0..10_000 {
        if let Message::Pong(p) = ws.read().unwrap() {
            assert_eq!(&p[..], b"hi");
            pong = true;
            break;
        }
    }
    assert!(pong, "client pings are answered");

    send(&mut ws, r#"{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":7}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": null, "id": 7}));
    send(&mut ws, r#"{"method":"LIST_SUBSCRIPTIONS","id":8}"#);
    assert_eq!(reply(&mut ws), serde_json::json!({"result": [], "id": 8}));

    // A stream in the path: bare events; µs on request.
    let mut raw = connect(&gw.url("/ws/ethusdt@kline_1s?timeUnit=MICROSECOND"));
    let ev = next_json(&mut raw);
    assert_eq!((ev["e"].as_str(), ev["k"]["i"].as_str()), (Some("kline"), Some("1s")), "{ev}");
    assert_eq!(ev["E"].as_i64().unwrap().to_string().len(), 16, "µs: {ev}");
    assert_eq!(ev["k"]["T"].as_i64().unwrap() - ev["k"]["t"].as_i64().unwrap(), 999_999, "{ev}");

    let stats = gw.stats();
    assert!(stats["request_errors"].as_u64().unwrap() >= 6, "{stats}");
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("client connected"), "one line per state change: {err}");
    let _ = broker.stop(Duration::from_secs(10));
    forget_bus(&bus);
}

#[test]
fn limits_answer_like_binance_and_close_abusers() {
    let bus = unique_bus("gwlim");
    let gw = Gateway::start(
        &bus,
        &["--max-streams", "3", "--max-connections", "3", "--ping-interval", "0.2", "--pong-timeout", "2"],
    );

    // Rate: 5 messages/s; a flood gets errors, then a close with a reason.
    let mut ws = connect(&gw.url("/ws"));
    for i in 0..30 {
        // The server may close before the flood ends: stop at the first failed write.
        if ws.send(Message::text(format!(r#"{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}"#))).is_err() {
            break;
        }
    }
    let mut ok = 0;
    let mut limited = 0;
    let close = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["error"]["code"] == -1003 {
                    limited += 1;
                } else {
                    assert_eq!(v["result"], serde_json::json!([]), "{v}");
                    ok += 1;
                }
            }
            Ok(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
            Ok(_) => {}
            Err(e) => panic!("no close: {e}"),
        }
    };
    assert!(ok >= 5, "the burst allowance: {ok}");
    assert!(limited >= 1, "over-limit messages get Binance's error first");
    assert_eq!(close.0, 1008, "{close:?}");
    assert!(close.1.contains("too many messages"), "{close:?}");
    drop(ws);

    // Streams per connection.
    let mut ws = connect(&gw.url("/ws"));
    send(&mut ws, r#"{"method":"SUBSCRIBE","params":["a@trade","b@trade","c@trade","d@trade"],"id":1}"#);
    let e = reply(&mut ws);
    assert_eq!(e["error"]["code"], 2, "{e}");
    assert!(e["error"]["msg"].as_str().unwrap().contains("too many streams"), "{e}");
    match tungstenite::connect(gw.url("/stream?streams=a@trade/b@trade/c@trade/d@trade")) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("expected HTTP 400, got {:?}", other.map(|_| ())),
    }
    // Message size.
    send(&mut ws, &"x".repeat(100 * 1024));
    assert_eq!(close_frame(&mut ws).0, 1009);
    drop(ws);

    // Pings: a reading client answers them and stays; a silent one is closed.
    let mut alive = connect(&gw.url("/ws"));
    let mut silent = connect(&gw.url("/ws"));
    let start = Instant::now();
    if let MaybeTlsStream::Plain(s) = alive.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(4000) {
        match alive.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(f)) => panic!("a client answering pings was closed: {f:?}"),
            _ => {}
        }
    }
    assert!(pings >= 2, "server pings: {pings}");
    // The silent client's connection is closed (its close frame may sit behind the pongs our
    // client library tries to send first, so the counters and the log tell the reason).
    loop {
        match silent.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 1008);
                assert!(f.reason.contains("pong"), "{f:?}");
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Our side of the close: the server waits for it (or end of stream) before freeing the slot.
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.stats()["connections_open"] != 1 {
        assert!(Instant::now() < deadline, "the silent client's slot is freed: {}", gw.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    send(&mut alive, r#"{"method":"LIST_SUBSCRIPTIONS","id":1}"#);
    if let MaybeTlsStream::Plain(s) = alive.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(reply(&mut alive)["id"], 1);

    // Connections: at most 3.
    let _b = connect(&gw.url("/ws"));
    let _c = connect(&gw.url("/ws"));
    match tungstenite::connect(gw.url("/ws")) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    let stats = gw.stats();
    for (k, min) in
        [("rate_limited", 1), ("disconnected_abuse", 2), ("disconnected_pong_timeout", 1), ("connections_refused", 1)]
    {
        assert!(stats[k].as_u64().unwrap() >= min, "{k}: {stats}");
    }
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("no pong received in time"), "{err}");
    forget_bus(&bus);
}

#[test]
fn a_token_guards_the_gateway_and_a_public_address_needs_one() {
    let bus = unique_bus("gwauth");
    let p = Proc::spawn("gateway", &["gateway", "--bus", &bus, "--listen", "0.0.0.0:0"]);
    let (ok, err) = p.wait(Duration::from_secs(20));
    assert!(!ok);
    assert!(err.contains("without an auth token"), "{err}");

    let gw = Gateway::start(&bus, &["--token", "s3cret"]);
    match tungstenite::connect(gw.url("/ws")) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected HTTP 401, got {:?}", other.map(|_| ())),
    }
    assert_eq!(http_get(gw.port, "/api/v3/ping", &[]).0, 401);
    assert_eq!(http_get(gw.port, "/api/v3/ping?token=s3cret", &[]).0, 200);
    assert_eq!(http_get(gw.port, "/api/v3/ping", &[("Authorization", "Bearer s3cret")]).0, 200);
    assert_eq!(http_get(gw.port, "/api/v3/ping", &[("Authorization", "Bearer wrong")]).0, 401);
    let mut ws = connect(&gw.url("/ws?token=s3cret"));
    send(&mut ws, r#"{"method":"LIST_SUBSCRIPTIONS","id":1}"#);
    assert_eq!(reply(&mut ws)["id"], 1);
    let mut req = gw.url("/ws").into_client_request().unwrap();
    req.headers_mut().insert("Authorization", "Bearer s3cret".parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    send(&mut ws, r#"{"method":"LIST_SUBSCRIPTIONS","id":2}"#);
    assert_eq!(reply(&mut ws)["id"], 2);
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}

/// Starts `fleet.py`: `clients` connections reading `btcusdt@trade` for `secs`.
fn fleet(gw: &Gateway, clients: u32, secs: u32) -> std::process::Child {
    Command::new(python())
        .arg(py_script("fleet.py"))
        .arg(gw.url("/ws/btcusdt@trade?timeUnit=MICROSECOND"))
        .args(["--clients", &clients.to_string(), "--seconds", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fleet_result(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "fleet: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A client subscribed to every K-line stream (and trades) that stops reading after its first
/// message.
fn stuck_client(gw: &Gateway, hold_secs: u32, trades: bool) -> std::process::Child {
    let mut streams = Vec::new();
    for s in ["btcusdt", "ethusdt", "bnbusdt"] {
        if trades {
            streams.push(format!("{s}@trade"));
        }
        for i in ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"] {
            streams.push(format!("{s}@kline_{i}"));
        }
    }
    Command::new(python())
        .arg(py_script("ws_collect.py"))
        .arg(gw.url(&format!("/stream?streams={}", streams.join("/"))))
        .args(["--stop-reading-after", "1", "--hold", &hold_secs.to_string(), "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_stuck_client_is_conflated_or_disconnected_and_the_others_miss_nothing() {
    let bus = unique_bus("gwslow");
    let _ = python();
    let broker = broker(&bus, "300", "0");
    let conflate = Gateway::start(&bus, &["--queue", "256"]);
    let disconnect = Gateway::start(&bus, &["--queue", "64", "--slow-client", "disconnect"]);

    // K-line updates conflate; a client stuck on trades too would be disconnected in the end
    // (trades are never dropped), so the conflating one takes K-lines only.
    let stuck_c = stuck_client(&conflate, 10, false);
    let stuck_d = stuck_client(&disconnect, 10, true);
    let many = fleet(&conflate, 100, 8);
    let few = fleet(&disconnect, 5, 8);

    let many = fleet_result(many);
    let few = fleet_result(few);
    eprintln!("100 clients beside a stuck one: {many}");
    for (f, n) in [(&many, 100), (&few, 5)] {
        assert_eq!(f["connected"], n, "{f}");
        assert_eq!(f["gaps"], 0, "no trade lost by any other client: {f}");
        assert!(f["min_messages"].as_u64().unwrap() > 0, "{f}");
    }
    let out_c = stuck_c.wait_with_output().unwrap();
    let out_d = stuck_d.wait_with_output().unwrap();
    let err_c = String::from_utf8_lossy(&out_c.stderr);
    let err_d = String::from_utf8_lossy(&out_d.stderr);
    // Disconnected: with a close frame (1008, "slow consumer") when the socket could take one, or
    // abruptly when it was full; the counter says which policy acted.
    assert!(err_d.contains("closed code="), "disconnect policy: {err_d}");
    assert!(err_c.contains("open"), "conflate policy keeps the client: {err_c}");

    let sc = conflate.stats();
    assert!(sc["conflated"].as_u64().unwrap() > 0, "updates conflated: {sc}");
    assert_eq!(sc["disconnected_slow"], 0, "{sc}");
    let sd = disconnect.stats();
    assert_eq!(sd["disconnected_slow"], 1, "{sd}");
    assert_eq!(sd["conflated"], 0, "{sd}");
    for g in [conflate, disconnect] {
        let (ok, err) = g.proc.stop(Duration::from_secs(10));
        assert!(ok, "{err}");
    }
    let _ = broker.stop(Duration::from_secs(10));
    forget_bus(&bus);
}

#[test]
fn the_health_stream_tells_a_quiet_feed_from_a_dead_publisher() {
    let bus = unique_bus("gwhealth");
    let broker = broker(&bus, "50", "0");
    let gw = Gateway::start(&bus, &[]);
    let mut ws = connect(&gw.url("/stream?streams=mdbus@health"));
    // Healthy and live while the broker runs (events on change and every second).
    let mut seen = Vec::new();
    loop {
        let v = next_json(&mut ws);
        assert_eq!(v["stream"], "mdbus@health", "{v}");
        let d = v["data"].clone();
        assert_eq!(d["e"], "health");
        seen.push(d.clone());
        if d["status"] == "healthy" && d["feed"] == "live" && d["lastSeq"].is_u64() {
            break;
        }
        assert!(seen.len() < 20, "never healthy and live: {seen:?}");
    }
    // kill -9: no goodbye, only silence; the heartbeats stop and the status says so.
    broker.signal(rustix::process::Signal::KILL);
    let start = Instant::now();
    loop {
        let d = next_json(&mut ws)["data"].clone();
        if d["status"] == "failed" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never failed: {d}");
    }
    let (st, body) = gw.get("/health");
    assert_eq!(st, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "failed", "{h}");
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("publisher health changed"), "{err}");
    drop(broker);
    forget_bus(&bus);
}
