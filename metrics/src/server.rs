//! `GET /metrics` over HTTP/1.1 on its own thread (a current-thread tokio runtime with hyper), so
//! a scrape never runs on a process's hot threads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::Families;

#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("metrics: cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("metrics: cannot start the server thread: {0}")]
    Start(std::io::Error),
}

/// A running metrics endpoint; it serves until the process exits.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    /// The bound address (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }
}

type Collect = Arc<dyn Fn() -> Families + Send + Sync>;

/// Listens on `addr` and serves `collect()`'s families at `/metrics` from a thread of its own.
pub fn serve(
    addr: &str,
    collect: impl Fn() -> Families + Send + Sync + 'static,
) -> Result<MetricsServer, MetricsServerError> {
    let std_listener = std::net::TcpListener::bind(addr).map_err(|e| MetricsServerError::Bind(addr.to_owned(), e))?;
    std_listener.set_nonblocking(true).map_err(|e| MetricsServerError::Bind(addr.to_owned(), e))?;
    let bound = std_listener.local_addr().map_err(|e| MetricsServerError::Bind(addr.to_owned(), e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(MetricsServerError::Start)?;
    let collect: Collect = Arc::new(collect);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics listener failed");
                        return;
                    }
                };
                loop {
                    let (tcp, _) = match listener.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let collect = Arc::clone(&collect);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let collect = Arc::clone(&collect);
                            async move { Ok::<_, Infallible>(respond(&req, &collect)) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(TokioIo::new(tcp), service);
                        let _ = conn.await;
                    });
                }
            });
        })
        .map_err(MetricsServerError::Start)?;
    tracing::info!(url = %format!("http://{bound}/metrics"), "metrics listening");
    Ok(MetricsServer { addr: bound })
}

fn respond(req: &Request<Incoming>, collect: &Collect) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", collect().encode()),
        (&Method::GET, "/") => {
            (StatusCode::OK, "text/plain; charset=utf-8", "mdbus metrics: GET /metrics\n".to_owned())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn a_scrape_reads_the_counters_as_they_are_now() {
        let n = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&n);
        let server = serve("127.0.0.1:0", move || {
            let mut f = Families::new();
            f.counter("things_total", "things", c.load(Ordering::Relaxed));
            f
        })
        .unwrap();
        assert!(get(server.addr(), "/metrics").contains("things_total 0"));
        let s = crate::scrape(&server.addr().to_string(), Duration::from_secs(5)).unwrap();
        assert_eq!((s[0].name.as_str(), s[0].value), ("things_total", 0.0));
        n.store(5, Ordering::Relaxed);
        let r = get(server.addr(), "/metrics");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("things_total 5"), "{r}");
        assert!(get(server.addr(), "/nope").starts_with("HTTP/1.1 404"));
        assert!(matches!(serve(&server.addr().to_string(), Families::new), Err(MetricsServerError::Bind(..))));
    }
}
