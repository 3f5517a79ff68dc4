//! HTTP on the gateway's port: the WebSocket upgrade (`/ws`, `/ws/<streams>`, `/stream`), the
//! REST calls Binance clients make before streaming, K-line history (`/api/v3/klines`, from the
//! database), and `/health`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mdbus_schema::json::TimeUnit;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::protocol::StreamName;
use crate::session::{self, ConnRequest};
use crate::Ctx;

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Binance's REST error body.
fn error(status: StatusCode, code: i32, msg: &str) -> Resp {
    json(status, serde_json::json!({ "code": code, "msg": msg }).to_string())
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                let shutdown = shutdown.clone();
                async move { Ok::<_, Infallible>(route(req, ctx, peer, shutdown).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

fn params(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn authorized(ctx: &Ctx, req: &Request<Incoming>, params: &[(String, String)]) -> bool {
    let Some(token) = ctx.cfg.token.as_deref() else { return true };
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or_else(|| param(params, "token"));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(req: Request<Incoming>, ctx: Arc<Ctx>, peer: SocketAddr, shutdown: watch::Receiver<bool>) -> Resp {
    let params = params(&req);
    if !authorized(&ctx, &req, &params) {
        return error(
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid token: send `Authorization: Bearer <token>` or ?token=",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, -1000, "only GET is supported");
    }
    let path = req.uri().path().to_owned();
    let stats = &ctx.state.stats;
    match path.as_str() {
        "/api/v3/ping" => {
            stats.rest_requests.fetch_add(1, Ordering::Relaxed);
            json(StatusCode::OK, "{}".into())
        }
        "/api/v3/time" => {
            stats.rest_requests.fetch_add(1, Ordering::Relaxed);
            let ms = crate::now_ns() / 1_000_000;
            json(StatusCode::OK, format!("{{\"serverTime\":{ms}}}"))
        }
        "/api/v3/exchangeInfo" => {
            stats.rest_requests.fetch_add(1, Ordering::Relaxed);
            crate::rest::exchange_info(&ctx, &params)
        }
        "/api/v3/klines" => {
            stats.rest_requests.fetch_add(1, Ordering::Relaxed);
            klines(&ctx, &params).await
        }
        "/health" => {
            let s = &ctx.state;
            let body = serde_json::json!({
                "status": s.health().as_str(),
                "feed": s.feed().as_str(),
                "last_seq": s.last_seq(),
                "stats": s.stats.to_json(),
            });
            json(StatusCode::OK, body.to_string())
        }
        p if p == "/ws" || p == "/stream" || p.starts_with("/ws/") => upgrade(req, &params, ctx, peer, shutdown),
        _ => error(StatusCode::NOT_FOUND, -1000, "not found"),
    }
}

/// `GET /api/v3/klines` (see [`crate::klines`]).
async fn klines(ctx: &Ctx, params: &[(String, String)]) -> Resp {
    let answer = match crate::klines::parse_query(params) {
        Err(e) => Err(e),
        Ok(q) => match &ctx.klines_db {
            None => Err(crate::klines::KlinesError {
                status: 503,
                code: -1000,
                msg: "No K-line database configured: start the gateway with --db URL.".into(),
            }),
            Some(db) => {
                let known = ctx.state.symbols.lock().is_ok_and(|s| s.contains(&q.symbol));
                db.query(q, known).await
            }
        },
    };
    match answer {
        Ok(rows) => json(StatusCode::OK, crate::klines::render(&rows)),
        Err(e) => {
            ctx.state.stats.request_errors.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.code, &e.msg)
        }
    }
}

/// Parses what the URL asks for (streams, combined, time unit, resume point).
fn conn_request(path: &str, params: &[(String, String)], peer: SocketAddr) -> Result<ConnRequest, String> {
    let (names, combined): (Vec<String>, bool) = if let Some(rest) = path.strip_prefix("/ws/") {
        let decoded = percent_encoding::percent_decode_str(rest).decode_utf8_lossy().into_owned();
        (decoded.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect(), false)
    } else if path == "/stream" {
        let list = param(params, "streams").unwrap_or("");
        (list.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect(), true)
    } else {
        (Vec::new(), false)
    };
    let streams =
        names.iter().map(|n| StreamName::parse(n).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let unit = match param(params, "timeUnit") {
        None => TimeUnit::Millisecond,
        Some(u) if u.eq_ignore_ascii_case("MILLISECOND") => TimeUnit::Millisecond,
        Some(u) if u.eq_ignore_ascii_case("MICROSECOND") => TimeUnit::Microsecond,
        Some(u) => return Err(format!("invalid timeUnit {u:?} (expected MILLISECOND or MICROSECOND)")),
    };
    let from_seq = match param(params, "fromSeq") {
        None => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| format!("invalid fromSeq {s:?}"))?),
    };
    Ok(ConnRequest { streams, combined, unit, from_seq, peer })
}

fn upgrade(
    mut req: Request<Incoming>,
    params: &[(String, String)],
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Resp {
    let stats = &ctx.state.stats;
    let wants_ws =
        req.headers().get(UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return error(StatusCode::BAD_REQUEST, -1000, "expected a WebSocket upgrade");
    };
    if !wants_ws || req.headers().get("sec-websocket-version").is_none_or(|v| v.as_bytes() != b"13") {
        return error(StatusCode::BAD_REQUEST, -1000, "expected a WebSocket upgrade (version 13)");
    }
    let conn = match conn_request(req.uri().path(), params, peer) {
        Ok(c) => c,
        Err(msg) => return error(StatusCode::BAD_REQUEST, -1100, &msg),
    };
    if conn.streams.len() > ctx.cfg.max_streams {
        return error(
            StatusCode::BAD_REQUEST,
            -1100,
            &format!("too many streams: at most {} per connection", ctx.cfg.max_streams),
        );
    }
    // Count the slot before the upgrade completes, so that a burst cannot overshoot the limit.
    let open = stats.connections_open.fetch_add(1, Ordering::Relaxed);
    if open >= ctx.cfg.max_connections as u64 {
        stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        stats.connections_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer, open, "connection refused: at the connection limit");
        return error(StatusCode::SERVICE_UNAVAILABLE, -1003, "too many connections");
    }
    stats.connections_total.fetch_add(1, Ordering::Relaxed);
    let on_upgrade = hyper::upgrade::on(&mut req);
    // Clients send little: a small read buffer (tungstenite zeroes the free part of it on every
    // read attempt, which at the 128 KiB default dominated the profile).
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(ctx.cfg.max_message_bytes))
        .max_frame_size(Some(ctx.cfg.max_message_bytes));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config)).await;
                session::run(ws, ctx, conn, shutdown).await;
            }
            Err(e) => {
                ctx.state.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(peer = %peer, error = %e, "websocket upgrade failed");
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn urls_parse_like_binance() {
        let c = conn_request("/ws/btcusdt@kline_1m", &[], peer()).unwrap();
        assert_eq!((c.streams.len(), c.combined), (1, false));
        let c = conn_request("/ws/btcusdt%40trade/ethusdt@kline_1M", &[], peer()).unwrap();
        assert_eq!(c.streams.len(), 2);
        let p = vec![
            ("streams".to_string(), "btcusdt@trade/ethusdt@kline_1s".to_string()),
            ("timeUnit".into(), "MICROSECOND".into()),
            ("fromSeq".into(), "42".into()),
        ];
        let c = conn_request("/stream", &p, peer()).unwrap();
        assert_eq!((c.streams.len(), c.combined, c.unit, c.from_seq), (2, true, TimeUnit::Microsecond, Some(42)));
        assert!(conn_request("/ws", &[], peer()).unwrap().streams.is_empty());
        assert!(conn_request("/ws/btcusdt@nope", &[], peer()).is_err());
        assert!(conn_request("/ws", &[("timeUnit".into(), "NANOSECOND".into())], peer()).is_err());
        assert!(conn_request("/ws", &[("fromSeq".into(), "-1".into())], peer()).is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
