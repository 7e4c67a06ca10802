//! The one small HTTP server behind /healthz, /livez, /metrics and the
//! health-check node ports: HTTP/1.1 (hyper), GET or anything else, a
//! handler that maps a path to a response.
//!
//! Handlers run on tokio's blocking pool: /metrics reads BPF maps, and the
//! agent's sync loop, on the same runtime, must never wait for a scrape.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr} for {what}: {source}")]
    Bind { addr: SocketAddr, what: &'static str, source: std::io::Error },
}

/// An answer: status, content type, extra headers, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: String) -> Self {
        Self { status, content_type, headers: Vec::new(), body }
    }

    pub fn not_found() -> Self {
        Self::new(404, "text/plain; charset=utf-8", "404 page not found\n".into())
    }
}

/// Maps a request path (without the query) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Clients that send nothing for this long are dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind `addr` (`what` names the listener in errors).
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, what, source })
}

/// Serve `listener` with `handler` until the returned task is aborted.
/// Connections accepted before that finish their current request.
pub fn serve(listener: TcpListener, handler: Handler) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handler = Arc::clone(&handler);
                    let path = req.uri().path().to_owned();
                    async move {
                        let r = tokio::task::spawn_blocking(move || handler(&path))
                            .await
                            .unwrap_or_else(|_| Response::new(500, "text/plain", "handler failed\n".into()));
                        Ok::<_, Infallible>(to_hyper(r))
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    log::debug!("http connection: {e}");
                }
            });
        }
    })
}

fn to_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut b = hyper::Response::builder()
        .status(r.status)
        .header("Content-Type", r.content_type)
        .header("X-Content-Type-Options", "nosniff");
    for (k, v) in r.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(r.body))).unwrap_or_else(|_| {
        let mut fallback = hyper::Response::new(Full::new(Bytes::from_static(b"bad response\n")));
        *fallback.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        fallback
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sockets are exercised in network namespaces by the integration tests
    // (tests/tests/ops.rs); here only the conversion.
    #[test]
    fn responses_carry_their_headers_and_nosniff() {
        let mut r = Response::new(503, "application/json", "{}".into());
        r.headers.push(("X-Load-Balancing-Endpoint-Weight", "0".into()));
        let h = to_hyper(r);
        assert_eq!(h.status(), 503);
        assert_eq!(h.headers()["content-type"], "application/json");
        assert_eq!(h.headers()["x-content-type-options"], "nosniff");
        assert_eq!(h.headers()["x-load-balancing-endpoint-weight"], "0");
    }
}
