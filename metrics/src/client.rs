//! Reading another process's `/metrics` (for `mdbus stats`): one HTTP/1.1 GET with hyper.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::{parse_text, Sample};

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{addr}: {detail}")]
    Failed { addr: String, detail: String },
}

/// The samples at `http://addr/metrics`, within `timeout`.
pub fn scrape(addr: &str, timeout: Duration) -> Result<Vec<Sample>, ScrapeError> {
    let fail = |detail: String| ScrapeError::Failed { addr: addr.to_owned(), detail };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| fail(e.to_string()))?;
    let text = rt.block_on(async {
        tokio::time::timeout(timeout, get(addr)).await.map_err(|_| "timed out".to_owned()).and_then(|r| r)
    });
    text.map(|t| parse_text(&t)).map_err(fail)
}

async fn get(addr: &str) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the response is not UTF-8".to_owned())
}
