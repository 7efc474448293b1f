//! The event log: Gatehouse's NATS JetStream stream, how it is created, and
//! the publisher that records events before commands run.
//!
//! Workers publish through [`Publisher`]; the control plane reads the same
//! stream with a durable consumer. Both call [`ensure_stream`] at start, so
//! whichever starts first creates the stream with the documented settings.
//!
//! Depends on the `events` contract and NATS only: no SQL, no Postgres wire.
#![forbid(unsafe_code)]

mod config;
pub mod embedded;
pub mod export;
mod publisher;
pub mod records;

pub use config::EventLogConfig;
pub use embedded::{EmbeddedError, EmbeddedLog, StoredEvent, private_file};
pub use publisher::{PublishError, Publisher};
pub use records::{Record, RecordError, RecordStore, RecordStream, StreamSettings};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

/// Why the process could not connect to NATS. Messages name the setting
/// and the file or variable, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("events.nats_password_env: environment variable {0} is not set")]
    PasswordEnv(String),
    #[error("events.{field}: cannot read {path}: {source}")]
    File {
        field: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot connect to NATS at {url}: {source} (is nats-server running with JetStream, \
         and do the [events] credentials and TLS settings match its configuration?)"
    )]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Where a process records events and keeps its records: NATS JetStream,
/// with the `[events]` settings, or the embedded store of a single node.
/// The worker and the control plane take one and do not look further.
#[derive(Clone)]
pub enum LogBackend {
    Nats {
        client: async_nats::Client,
        config: EventLogConfig,
    },
    Embedded {
        log: EmbeddedLog,
        /// Its subjects (`subject_prefix`); the NATS settings are unused.
        config: EventLogConfig,
    },
}

impl LogBackend {
    pub fn config(&self) -> &EventLogConfig {
        match self {
            LogBackend::Nats { config, .. } | LogBackend::Embedded { config, .. } => config,
        }
    }

    /// The NATS connection, when the log is on JetStream.
    pub fn nats(&self) -> Option<&async_nats::Client> {
        match self {
            LogBackend::Nats { client, .. } => Some(client),
            LogBackend::Embedded { .. } => None,
        }
    }

    /// Creates the event stream if it is missing (JetStream) and starts
    /// the group-commit publisher on the current runtime.
    pub async fn publisher(&self) -> Result<Publisher, StreamError> {
        match self {
            LogBackend::Nats { client, config } => {
                ensure_stream(&jetstream::new(client.clone()), config).await?;
                Ok(Publisher::start(client.clone(), config))
            }
            LogBackend::Embedded { log, config } => {
                Ok(Publisher::embedded(log.clone(), config.subjects()))
            }
        }
    }

    /// Where streams of records (policy bundles, revocations, user names)
    /// are kept.
    pub fn records(&self) -> RecordStore {
        match self {
            LogBackend::Nats { client, .. } => {
                RecordStore::JetStream(jetstream::new(client.clone()))
            }
            LogBackend::Embedded { log, .. } => RecordStore::Embedded(log.clone()),
        }
    }

    /// Sends a signal on `subject` to every [`Self::signals`] subscriber:
    /// a NATS core message (not stored), or, on the embedded store, a
    /// message to the other parts of this process (a single node has no
    /// other). A signal nobody listens to is dropped.
    pub async fn signal(&self, subject: &str, payload: Bytes) -> Result<(), String> {
        match self {
            LogBackend::Nats { client, .. } => client
                .publish(subject.to_string(), payload)
                .await
                .map_err(|e| e.to_string()),
            LogBackend::Embedded { log, .. } => {
                let _ = log.signals().send((subject.to_string(), payload));
                Ok(())
            }
        }
    }

    /// The signals sent on `subject` from now on.
    pub async fn signals(
        &self,
        subject: &str,
    ) -> Result<futures::stream::BoxStream<'static, Bytes>, String> {
        use futures::StreamExt;
        match self {
            LogBackend::Nats { client, .. } => {
                let sub = client
                    .subscribe(subject.to_string())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(sub.map(|m| m.payload).boxed())
            }
            LogBackend::Embedded { log, .. } => {
                let subject = subject.to_string();
                let rx = log.signals().subscribe();
                Ok(futures::stream::unfold(rx, move |mut rx| {
                    let subject = subject.clone();
                    async move {
                        loop {
                            match rx.recv().await {
                                Ok((s, payload)) if s == subject => return Some((payload, rx)),
                                Ok(_) => continue,
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                    tracing::warn!(
                                        missed = n,
                                        "signals dropped: the reader fell behind"
                                    );
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                    return None;
                                }
                            }
                        }
                    }
                })
                .boxed())
            }
        }
    }

    /// Whether the log can be written now: NATS connected, or embedded.
    pub fn connected(&self) -> bool {
        match self {
            LogBackend::Nats { client, .. } => {
                client.connection_state() == async_nats::connection::State::Connected
            }
            LogBackend::Embedded { .. } => true,
        }
    }

    /// What the log is, for readiness and start-up messages.
    pub fn describe(&self) -> String {
        match self {
            LogBackend::Nats { config, .. } => format!("NATS JetStream at {}", config.nats_url),
            LogBackend::Embedded { log, .. } => format!("embedded, {}", log.path().display()),
        }
    }
}

/// Connects to NATS as `[events]` says: its URLs, credentials and TLS. Every
/// NATS connection of a Gatehouse process is made here, so none goes out
/// without them.
pub async fn connect(
    config: &EventLogConfig,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|source| ConnectError::File {
                field,
                path: path.display().to_string(),
                source,
            })
    };
    let mut options = async_nats::ConnectOptions::new().name(name);
    if let Some(user) = &config.nats_user {
        let password = match (&config.nats_password_env, &config.nats_password_file) {
            (Some(var), _) => {
                std::env::var(var).map_err(|_| ConnectError::PasswordEnv(var.clone()))?
            }
            (None, Some(path)) => read("nats_password_file", path)?,
            (None, None) => String::new(),
        };
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(path) = &config.nats_nkey_file {
        options = options.nkey(read("nats_nkey_file", path)?.trim().to_owned());
    }
    if let Some(path) = &config.nats_creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::File {
                field: "nats_creds_file",
                path: path.display().to_string(),
                source,
            })?;
    }
    if config.nats_tls() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.nats_tls_ca_file {
        // Read here so that a missing file is named before connecting.
        read("nats_tls_ca_file", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.nats_tls_cert_file, &config.nats_tls_key_file) {
        read("nats_tls_cert_file", cert)?;
        read("nats_tls_key_file", key)?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options
        .connect(config.nats_url.as_str())
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.nats_url.clone(),
            source,
        })
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot create or update JetStream stream {stream:?}: {source}")]
    Create {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Creates the event stream if it is missing, with the settings in `config`
/// (file storage, limits retention, duplicate window for `Nats-Msg-Id`).
/// An existing stream is left as it is: operators may have tuned it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &EventLogConfig,
) -> Result<stream::Stream, StreamError> {
    get_or_create_stream(js, config.stream_config())
        .await
        .map_err(|e| StreamError::Create {
            stream: config.stream.clone(),
            source: Box::new(e),
        })
}

/// Opens a stream, creating it when missing, riding over the server's
/// transient failure to create a stream's files.
///
/// nats-server answers any failure of its file store while creating a
/// stream with one generic error (code 500, 10049, "error creating store for
/// stream") and writes the cause only to its own log; on a busy server that
/// is creating and deleting other streams the same request succeeds a moment
/// later. Five tries over about 1.5 s: a lasting cause (a full disk) still
/// reaches the caller, with the server's words.
pub(crate) async fn get_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    use jetstream::context::CreateStreamErrorKind;
    const TRIES: u32 = 5;
    let mut pause = std::time::Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Err(e)
                if attempt < TRIES
                    && matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_CREATE) =>
            {
                tracing::warn!(stream = config.name, attempt, error = %e, "JetStream could not create the stream's store; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}
