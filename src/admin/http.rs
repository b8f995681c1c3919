//! `/metrics`, `/livez` and `/readyz` over HTTP/1.1 on hyper.
//!
//! GET only; at most [`MAX_HTTP_CONNECTIONS`] connections at a time (more are
//! closed at once), a request head bounded to [`MAX_REQUEST_HEAD`] bytes and
//! [`REQUEST_TIMEOUT`], one request per connection. That is all a Prometheus
//! scraper and a kubelet probe need. Parsing, oversized heads (431) and
//! malformed requests (400) are hyper's.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Metrics;

/// Largest HTTP request head accepted (request line plus headers); hyper's
/// smallest read buffer.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one connection may take in all (a client that never reads its
/// response cannot hold a slot for longer).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent HTTP connections; more are closed at once.
pub const MAX_HTTP_CONNECTIONS: usize = 16;

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Accepts HTTP connections on `listener` forever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let limit = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            continue; // dropped: too many concurrent scrapers
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(metrics, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                tracing::debug!(error = %e, "metrics connection failed");
            }
            drop(permit);
        });
    }
}

/// Answers one request. Rendering `/metrics` folds pending histogram
/// samples, so it runs on the blocking pool, off the async workers.
async fn respond<B>(metrics: Arc<Metrics>, req: Request<B>) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let body = tokio::task::spawn_blocking(move || metrics.render())
            .await
            .unwrap_or_default();
        return response(StatusCode::OK, PROMETHEUS_TEXT, body);
    }
    route(&metrics, &req)
}

/// The response to everything but a `GET /metrics`.
fn route<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut r = response(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is supported\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => response(StatusCode::OK, PROMETHEUS_TEXT, metrics.render()),
        "/livez" => response(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => match metrics.readiness() {
            Ok(()) => response(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => response(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /livez, /readyz\n".into(),
        ),
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use std::sync::atomic::Ordering;

    fn get(m: &Metrics, method: Method, path: &str) -> (StatusCode, Option<String>) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let r = route(m, &req);
        let allow = r
            .headers()
            .get(ALLOW)
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status(), allow)
    }

    #[test]
    fn routes() {
        let rec = super::super::exporter::build_recorder();
        let health = Arc::new(Health::default());
        let m = metrics::with_local_recorder(&rec, || {
            Metrics::new(rec.handle(), Arc::clone(&health), false)
        });
        assert_eq!(get(&m, Method::GET, "/livez").0, StatusCode::OK);
        assert_eq!(
            get(&m, Method::GET, "/readyz").0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.ready.store(true, Ordering::Release);
        assert_eq!(get(&m, Method::GET, "/readyz?verbose").0, StatusCode::OK);
        assert_eq!(get(&m, Method::GET, "/nope").0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&m, Method::POST, "/livez"),
            (StatusCode::METHOD_NOT_ALLOWED, Some("GET".into()))
        );
        assert_eq!(get(&m, Method::GET, "/metrics").0, StatusCode::OK);
    }
}
