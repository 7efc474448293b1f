//! The API's listener: plain TCP, or TLS (rustls) in front of the same
//! router. TLS handshakes run on their own tasks with a time limit, so a
//! client that never finishes one holds up nobody else.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its TLS handshake with the API.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API's TLS settings cannot be used. Messages name the field.
#[derive(Debug, thiserror::Error)]
pub enum ApiTlsError {
    #[error("api.tls_cert_file: cannot read {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("api.tls_cert_file: no certificate in {0}")]
    NoCert(String),
    #[error("api.tls_key_file: cannot read {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("api.tls_key_file: does not match the certificate: {0}")]
    Mismatch(#[source] rustls::Error),
}

/// Where the API is served: plain HTTP or HTTPS.
pub enum ApiListener {
    Plain(TcpListener),
    Tls {
        listener: TcpListener,
        acceptor: TlsAcceptor,
    },
}

impl From<TcpListener> for ApiListener {
    fn from(listener: TcpListener) -> Self {
        Self::Plain(listener)
    }
}

impl ApiListener {
    /// HTTPS on `listener` with the certificate chain and key in PEM files.
    pub fn tls(listener: TcpListener, cert: &Path, key: &Path) -> Result<Self, ApiTlsError> {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ApiTlsError::Cert {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(ApiTlsError::NoCert(cert.display().to_string()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ApiTlsError::Key {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(ApiTlsError::Mismatch)?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(ApiTlsError::Mismatch)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self::Tls {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Plain(l) | Self::Tls { listener: l, .. } => l.local_addr(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }
}

/// Accepted, handshaken TLS connections, for `axum::serve`.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, as
                        // axum does for plain TCP.
                        tracing::warn!(error = %e, "API cannot accept a connection");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            addr,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task is gone (it only ends when aborted).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
