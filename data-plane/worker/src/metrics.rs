//! The worker's Prometheus endpoint: `GET /metrics` on
//! `worker.metrics_listen`, serving the counters of [`Admission`].

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::WorkerError;
use crate::admission::Admission;

/// Binds `addr` and serves `/metrics` until the returned task is aborted.
pub(crate) async fn serve(
    addr: &str,
    admission: Arc<Admission>,
) -> Result<tokio::task::JoinHandle<()>, WorkerError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        WorkerError::Config(format!("worker.metrics_listen: cannot bind {addr}: {e}"))
    })?;
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "worker metrics listening"
    );
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let admission = admission.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    admission.counters.render(),
                )
            }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    }))
}
