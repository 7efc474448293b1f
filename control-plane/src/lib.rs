//! The Gatehouse control plane: projects the event log into the audit
//! tables (PostgreSQL, or a SQLite file on a single node) and serves the
//! audit HTTP API.
//!
//! - [`Projector`] reads the JetStream event stream with a durable pull
//!   consumer and writes `events`, `sessions`, `commands` and
//!   `authentication_failures` of the [`AuditStore`]; what it cannot
//!   project goes raw into `quarantine`, never dropped. Projections are
//!   idempotent and rebuildable: the event log stays the source of truth.
//! - [`router`] serves `/healthz`, `/readyz` and the audit search under
//!   `/api/v1`, for holders of an OIDC token in the auditor group.
//! - [`run`] starts both and stops them on shutdown.
//!
//! It depends on the `events` contract, the `eventlog` stream settings and
//! `identity` token verification. It must not depend on the Postgres wire
//! protocol (`data-plane/pgwire`) or on worker code (`data-plane/worker`):
//! the control plane only sees what workers recorded.
#![forbid(unsafe_code)]

mod access_api;
mod api;
mod approval_api;
mod approval_audit;
mod audit;
mod auth;
mod config;
mod listener;
mod notify;
mod policy_api;
mod projector;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use futures::FutureExt;
use gatehouse_eventlog::LogBackend;
use gatehouse_identity::Verifier;

pub use api::{ApiState, router};
pub use audit::{AuditStore, DbError, connect_audit_db};
pub use config::{AuditDbTls, ControlPlaneConfig};
pub use listener::{ApiListener, ApiTlsError};
pub use notify::{WebhookConfig, WebhookFormat};
pub use policy_api::PolicyApi;
pub use projector::{Projector, ProjectorError, ProjectorStats};

/// Runs the control plane until `shutdown` completes: prepares the audit
/// database, starts the projector and serves the API (merged with
/// `extra_routes`, e.g. the development issuer) on `listener` (plain HTTP
/// from a `TcpListener`, or HTTPS with [`ApiListener::tls`]). On shutdown
/// the server drains its requests and the projector finishes its batch.
#[allow(clippy::too_many_arguments)] // each is a separate dependency the binary hands in
pub async fn run(
    config: ControlPlaneConfig,
    policy: gatehouse_policystore::PolicyConfig,
    log: LogBackend,
    listener: impl Into<ApiListener>,
    verifier: Arc<Verifier>,
    extra_routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    log.config().validate().map_err(anyhow::Error::msg)?;
    let audit = connect_audit_db(&config).await?;
    let publisher = log.publisher().await?;
    let store = gatehouse_policystore::PolicyStore::open(&log.records(), &policy).await?;
    // What the control plane writes there is signed with the key bundles
    // are, so that workers honour access granted only as it was decided.
    let approvals = gatehouse_policystore::approvals::Approvals::open(
        &log.records(),
        &policy.revocation_stream,
    )
    .await?
    .signed(
        policy.signer().map_err(anyhow::Error::msg)?,
        policy.trusted_keys().map_err(anyhow::Error::msg)?,
    );
    let source = format!("control-plane-{}", std::process::id());
    let policy = PolicyApi::new(store, publisher, policy, source);
    let projector = Projector::new(audit.clone(), &log, config.consumer.clone()).await?;

    let hooks = notify::prepare(&config.approval_webhooks).map_err(anyhow::Error::msg)?;
    let notifier = tokio::spawn(notify::run(
        approvals.clone(),
        hooks,
        config.approval_link.clone(),
    ));
    let approval_audit = tokio::spawn(approval_audit::run(approvals.clone(), audit.clone()));
    let projector_stats = projector.stats();
    let shutdown = shutdown.shared();
    let projector = tokio::spawn(projector.run(shutdown.clone()));
    let app = router(ApiState {
        audit,
        log,
        verifier,
        auditor_group: config.auditor_group,
        max_page: config.max_page,
        policy,
        projector: projector_stats,
        approvals,
    })
    .merge(extra_routes);
    let listener = listener.into();
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        tls = listener.is_tls(),
        "control plane API listening"
    );
    let served = match listener {
        ApiListener::Plain(listener) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        ApiListener::Tls { listener, acceptor } => {
            match listener::TlsListener::new(listener, acceptor) {
                Ok(listener) => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                }
                Err(e) => Err(e),
            }
        }
    };
    notifier.abort();
    approval_audit.abort();
    if let Err(e) = served {
        projector.abort();
        return Err(e).context("control plane API server failed");
    }
    projector.await.context("projector task panicked")?;
    Ok(())
}
