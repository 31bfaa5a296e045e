//! The operator's HTTP endpoint: `/metrics`, `/healthz` (process alive) and
//! `/readyz` (watches running, whether leading or standing by).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once the operator is up (leading or following).
    pub ready: Arc<AtomicBool>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let metrics = Arc::new(Metrics::new().expect("metrics"));
            metrics.count("SmtpRelay", "ok");
            let ready = Arc::new(AtomicBool::new(false));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let state = HttpState {
                metrics,
                ready: ready.clone(),
            };
            tokio::spawn(async move { axum::serve(listener, router(state)).await });
            assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
            assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
            ready.store(true, Ordering::Relaxed);
            assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
            assert!(
                get(addr, "/metrics")
                    .await
                    .contains("petrel_operator_reconciles_total")
            );
        })
        .await
        .expect("bounded");
    }
}
