//! `gatehouse worker` and `gatehouse control-plane`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use gatehouse_eventlog::LogBackend;
use gatehouse_identity::Verifier;

use crate::config::{Config, LogConfig, LogFormat, Role};

pub fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Connects to NATS with the `[events]` URL, credentials and TLS.
pub async fn connect_nats(
    events: &gatehouse_eventlog::EventLogConfig,
) -> anyhow::Result<async_nats::Client> {
    Ok(gatehouse_eventlog::connect(events, "gatehouse").await?)
}

pub async fn worker(path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    init_logging(&config.log);
    config.check_worker().context("invalid configuration")?;
    config.log_insecure(Role::Worker);
    let verifier = Arc::new(Verifier::new(config.oidc.clone()).map_err(anyhow::Error::msg)?);
    let nats = connect_nats(&config.events).await?;
    let listener = tokio::net::TcpListener::bind(&config.worker.listen)
        .await
        .with_context(|| format!("worker.listen: cannot listen on {}", config.worker.listen))?;
    gatehouse_worker::run(
        config.worker,
        config.policy,
        LogBackend::Nats {
            client: nats,
            config: config.events,
        },
        verifier,
        listener,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn control_plane(path: &Path) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    init_logging(&config.log);
    config
        .check_control_plane()
        .context("invalid configuration")?;
    config.log_insecure(Role::ControlPlane);
    let verifier = Arc::new(Verifier::new(config.oidc.clone()).map_err(anyhow::Error::msg)?);
    let nats = connect_nats(&config.events).await?;
    let tcp = tokio::net::TcpListener::bind(&config.api.listen)
        .await
        .with_context(|| format!("api.listen: cannot listen on {}", config.api.listen))?;
    let listener = match (&config.api.tls_cert_file, &config.api.tls_key_file) {
        (Some(cert), Some(key)) => gatehouse_control_plane::ApiListener::tls(tcp, cert, key)?,
        _ => tcp.into(),
    };
    gatehouse_control_plane::run(
        config.control_plane,
        config.policy,
        LogBackend::Nats {
            client: nats,
            config: config.events,
        },
        listener,
        verifier,
        axum::Router::new(),
        shutdown_signal(),
    )
    .await
}
