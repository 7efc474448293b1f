//! A connection that may or may not be wrapped in TLS, and how bytes are
//! sent on it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

/// Writes all of `bytes` and flushes them to the socket.
///
/// Every write goes through here: on a TLS stream, `write_all` may leave the
/// last records in the TLS layer's buffer when the socket is momentarily
/// full, and nothing sends them until the next write. When the peer then
/// waits for those bytes (a `CopyDone`, a `ReadyForQuery`) before sending
/// anything, the session stalls.
pub async fn send<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::send;

    /// A TLS session over a pipe that holds 1 KiB: most of a large message
    /// can only leave the writer's TLS buffer while the reader reads.
    #[tokio::test]
    async fn send_delivers_every_byte_over_tls_when_the_pipe_is_full() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = CertificateDer::from(generated.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let (a, b) = tokio::io::duplex(1024);
        let name = ServerName::try_from("localhost").unwrap();
        let (writer, reader) = tokio::join!(
            TlsConnector::from(Arc::new(client)).connect(name, a),
            TlsAcceptor::from(Arc::new(server)).accept(b),
        );
        let (mut writer, mut reader) = (writer.unwrap(), reader.unwrap());

        let message = vec![7u8; 256 * 1024];
        let sent = message.clone();
        let (done, hold) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            send(&mut writer, &sent).await.unwrap();
            // The writer has nothing more to say but keeps the session open,
            // like a client waiting for the answer to its last message.
            let _ = hold.await;
            drop(writer);
        });
        let mut received = vec![0u8; message.len()];
        let read =
            tokio::time::timeout(Duration::from_secs(10), reader.read_exact(&mut received)).await;
        drop(done);
        assert!(
            read.is_ok(),
            "the last bytes stayed in the writer's TLS buffer"
        );
        assert_eq!(received, message);
    }
}
