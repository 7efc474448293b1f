//! The Gatehouse data-plane worker.
//!
//! A worker speaks the PostgreSQL protocol to clients (psql, drivers, AI
//! agents), authenticates each one by OIDC token, logs in to the target with
//! credentials only it holds, and relays the session. Every command is
//! recorded as a `CommandReceived` event and acknowledged by JetStream
//! **before** it is forwarded; if recording fails, the command does not run.
//!
//! Layout: [`session`] is the per-connection state machine (startup, TLS,
//! authentication, target login); [`relay`] carries the two directions of an
//! open session; [`backend`] is the worker's own client to targets;
//! [`cancel`] routes cancel requests, also across workers; [`encoding`]
//! reads client text as the server does (its `client_encoding` and
//! `standard_conforming_strings`). The wire codec is
//! the pure `gatehouse-pgwire` crate; events are `gatehouse-events`.
//!
//! Must not depend on the control plane or on SQL storage.
#![forbid(unsafe_code)]

mod admission;
mod approvals;
mod backend;
mod cancel;
pub mod config;
mod conn;
mod encoding;
pub mod error;
mod machine;
pub mod masking;
mod metrics;
mod policy;
mod relay;
mod session;
mod tls;
mod usernames;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use gatehouse_eventlog::{LogBackend, Publisher};
use gatehouse_identity::Verifier;
use gatehouse_policystore::{PolicyConfig, PolicyStore};
use tokio::net::TcpListener;

pub use config::{CancelKey, ChannelBinding, TargetAuth, TargetConfig, TargetTls, WorkerConfig};

/// The session machine driven by arbitrary bytes, for the fuzz target.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::machine::fuzz::run;
}

/// A target with its prepared TLS settings.
pub(crate) struct Target {
    pub name: String,
    pub config: TargetConfig,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// What policies know about the target.
    pub fn info(&self) -> gatehouse_policies::TargetInfo {
        gatehouse_policies::TargetInfo {
            name: self.name.clone(),
            kind: "postgres".into(),
            environment: self.config.environment.clone(),
            tags: self.config.tags.clone(),
        }
    }
}

/// What every session of a worker shares.
pub(crate) struct Shared {
    pub worker_id: String,
    pub config: WorkerConfig,
    pub verifier: Arc<Verifier>,
    pub publisher: Publisher,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub targets: HashMap<String, Arc<Target>>,
    pub cancels: Arc<cancel::CancelRegistry>,
    /// The event log; cancel requests reach other workers through its
    /// signals.
    pub log: LogBackend,
    /// Becomes `true` when open sessions must end (after the drain period).
    pub closing: tokio::sync::watch::Receiver<bool>,
    pub policy_config: PolicyConfig,
    /// The current bundle and revocations.
    pub policies: policy::Policies,
    /// Connection and login limits, and the worker's counters.
    pub admission: Arc<admission::Admission>,
    /// Which subject each user name belongs to.
    pub usernames: usernames::UserNames,
    /// Approvals of commands that wait for one, and who waits on which.
    pub approvals: approvals::Waiters,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Stream(#[from] gatehouse_eventlog::StreamError),
    #[error("cannot subscribe to cancel requests: {0}")]
    Subscribe(String),
    #[error("policy store: {0}")]
    Policies(String),
}

/// Runs a worker on `listener` until `shutdown` resolves. `config` must have
/// been prepared ([`WorkerConfig::prepare`]).
pub async fn run(
    config: WorkerConfig,
    policy_config: PolicyConfig,
    log: LogBackend,
    verifier: Arc<Verifier>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let publisher = log.publisher().await?;
    let records = log.records();
    let store = PolicyStore::open(&records, &policy_config)
        .await
        .map_err(|e| WorkerError::Policies(e.to_string()))?;
    // Access granted for a while counts only as the control plane signed
    // it, with the keys bundles are checked with.
    let approvals = gatehouse_policystore::approvals::Approvals::open(
        &records,
        &policy_config.revocation_stream,
    )
    .await
    .map_err(|e| WorkerError::Policies(e.to_string()))?
    .signed(
        None,
        policy_config
            .trusted_keys()
            .map_err(WorkerError::Policies)?,
    );
    let policies = policy::start(store, approvals.clone())
        .await
        .map_err(WorkerError::Policies)?;
    let usernames = usernames::UserNames::open(
        &records,
        &usernames::stream_for(&policy_config.revocation_stream),
    )
    .await
    .map_err(WorkerError::Policies)?;
    let worker_id = config.worker_id();
    let lease_task = tokio::spawn(renew_lease(approvals.clone(), worker_id.clone()));
    let approvals = approvals::Waiters::start(approvals)
        .await
        .map_err(WorkerError::Policies)?;

    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            tls::server_config(cert, key).map_err(WorkerError::Config)?,
        )),
        _ => None,
    };
    let mut targets = HashMap::new();
    for (name, t) in &config.targets {
        let tls = tls::target_config(name, t).map_err(WorkerError::Config)?;
        targets.insert(
            name.clone(),
            Arc::new(Target {
                name: name.clone(),
                config: t.clone(),
                tls,
            }),
        );
    }
    announce_targets(&approvals.approvals, &targets, &worker_id).await?;
    let cancels = Arc::new(cancel::CancelRegistry::default());
    let sub = log
        .signals(&config.cancel_subject)
        .await
        .map_err(WorkerError::Subscribe)?;
    let cancel_task = tokio::spawn(cancel::serve_forwarded(
        cancels.clone(),
        config.cancel_key.clone(),
        config.cancel_subject.clone(),
        sub,
    ));

    let (close_sessions, closing) = tokio::sync::watch::channel(false);
    let drain = std::time::Duration::from_secs(config.drain_timeout_secs);
    let admission = admission::Admission::new(&config);
    let metrics_task = match &config.metrics_listen {
        Some(addr) => Some(metrics::serve(addr, admission.clone()).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        approvals,
        admission,
        usernames,
        closing,
        policy_config,
        policies,
        worker_id,
        config,
        verifier,
        publisher,
        tls,
        targets,
        cancels,
        log,
    });
    tracing::info!(
        worker = %shared.worker_id,
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "worker listening"
    );

    tokio::pin!(shutdown);
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match shared.admission.admit(peer.ip()) {
                    Ok(permit) => {
                        sessions.spawn(session::handle(shared.clone(), tcp, peer, permit));
                    }
                    Err(refused) => {
                        // Answered in plain text before any TLS work: a
                        // client that sent nothing yet reads an
                        // ErrorResponse; one that sent an SSLRequest reads
                        // a refusal of it.
                        let mut out = bytes::BytesMut::new();
                        refused.encode(&mut out);
                        let _ = tcp.try_write(&out);
                        tracing::debug!(%peer, reason = %refused.message, "connection refused at a limit");
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = ended
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "session task panicked; its connections were closed");
                }
            }
            _ = &mut shutdown => break,
        }
    }

    // Drain: stop accepting, let open sessions finish for a while, then end
    // the rest (each records its SessionClosed with reason worker_shutdown).
    drop(listener);
    tracing::info!(sessions = sessions.len(), ?drain, "worker draining");
    let all_done = async |sessions: &mut tokio::task::JoinSet<()>| {
        while sessions.join_next().await.is_some() {}
    };
    if tokio::time::timeout(drain, all_done(&mut sessions))
        .await
        .is_err()
    {
        let _ = close_sessions.send(true);
        if tokio::time::timeout(std::time::Duration::from_secs(15), all_done(&mut sessions))
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = sessions.len(),
                "sessions did not end; dropping them"
            );
        }
    }
    cancel_task.abort();
    lease_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Announces the targets this worker fronts, with the attributes policies
/// see, so that access to them can be asked for and decided by name.
async fn announce_targets(
    approvals: &gatehouse_policystore::approvals::Approvals,
    targets: &HashMap<String, Arc<Target>>,
    worker_id: &str,
) -> Result<(), WorkerError> {
    for (name, t) in targets {
        let info = t.info();
        let known = gatehouse_policystore::approvals::KnownTarget {
            target: gatehouse_events::approval::ApprovalTarget {
                name: info.name,
                kind: info.kind,
                environment: info.environment,
                tags: info.tags,
            },
            worker_id: worker_id.to_string(),
            announced_at: chrono::Utc::now(),
        };
        approvals
            .announce(&known)
            .await
            .map_err(|e| WorkerError::Policies(format!("cannot announce target {name}: {e}")))?;
    }
    Ok(())
}

/// Renews the worker's lease on the approvals stream until aborted: while
/// it is fresh, the commands waiting in its sessions count as held (see
/// `gatehouse_policystore::approvals`).
async fn renew_lease(approvals: gatehouse_policystore::approvals::Approvals, worker_id: String) {
    use gatehouse_policystore::approvals::{LEASE_INTERVAL, Lease};
    let started_at = chrono::Utc::now();
    let mut tick = tokio::time::interval(LEASE_INTERVAL);
    loop {
        tick.tick().await;
        let lease = Lease {
            worker_id: worker_id.clone(),
            started_at,
            renewed_at: chrono::Utc::now(),
        };
        if let Err(e) = approvals.renew(&lease).await {
            tracing::warn!(error = %e, "cannot renew the worker's approval lease");
        }
    }
}
