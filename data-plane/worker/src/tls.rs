//! TLS on both hops: the server side for clients, the client side for
//! targets (verified by default).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{TargetConfig, TargetTls};

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("worker.tls_cert_file: cannot read {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "worker.tls_cert_file: no certificate in {}",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("worker.tls_key_file: cannot read {}: {e}", key.display()))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("worker.tls_key_file: does not match the certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// The client TLS config for a target, or `None` when TLS is disabled.
pub fn target_config(
    name: &str,
    target: &TargetConfig,
) -> Result<Option<Arc<ClientConfig>>, String> {
    let builder = ClientConfig::builder();
    let config = match target.tls {
        TargetTls::Disable => return Ok(None),
        TargetTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(
                rustls::crypto::ring::default_provider(),
            )))
            .with_no_client_auth(),
        TargetTls::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match &target.tls_ca_file {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path)
                        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| {
                            format!(
                                "worker.targets.{name}.tls_ca_file: cannot read {}: {e}",
                                path.display()
                            )
                        })?;
                    roots.add_parsable_certificates(certs);
                }
                None => {
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                }
            }
            if roots.is_empty() {
                return Err(format!(
                    "worker.targets.{name}.tls_ca_file: no trusted CA certificates found"
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// `tls = "require"`: encrypt without checking who answers.
#[derive(Debug)]
struct NoVerification(rustls::crypto::CryptoProvider);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
