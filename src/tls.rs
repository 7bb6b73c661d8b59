//! TLS client configurations: trust roots, client certificates and `insecureSkipVerify`, for
//! webhook deliveries and for Herald's own connections (the PostgreSQL store).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The TLS side of a client: what it trusts and how it identifies itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsSettings<'a> {
    /// Accept any server certificate.
    pub insecure_skip_verify: bool,
    /// Extra trusted CA certificates (PEM), on top of the public roots.
    pub roots: &'a [u8],
    /// Client certificate chain and key (PEM), for mutual TLS.
    pub identity: Option<&'a [u8]>,
}

/// Why a TLS configuration could not be built. Messages never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA bundle has no certificate, or one rustls refuses.
    #[error("the CA bundle holds no usable PEM certificate{0}")]
    Roots(String),
    /// The client certificate and key cannot be used together.
    #[error("the client certificate and key are not a usable PEM certificate chain and key: {0}")]
    Identity(String),
}

/// Checks a CA bundle: at least one PEM certificate, every one readable.
pub fn check_roots(pem: &[u8]) -> Result<(), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, pem)
}

/// Checks a client certificate chain and key (PEM, concatenated) without building a client.
pub fn check_identity(pem: &[u8]) -> Result<(), TlsError> {
    identity(pem).map(|_| ())
}

fn add_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), TlsError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Roots(format!(": {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::Roots(format!(": {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsError::Roots(String::new()));
    }
    Ok(())
}

fn identity(
    pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Identity(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Identity("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsError::Identity(format!("private key: {e}")))?;
    Ok((chain, key))
}

/// A TLS client configuration that trusts the public roots and the CA certificates in `roots`
/// (PEM; none when empty), without a client certificate: for connections that are not webhook
/// deliveries, such as the PostgreSQL store's.
pub fn client_config_trusting(roots: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    client_config(&TlsSettings {
        roots,
        ..TlsSettings::default()
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client configuration for a set of TLS settings.
pub fn client_config(settings: &TlsSettings<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let builder = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
    } else {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if !settings.roots.is_empty() {
            add_roots(&mut roots, settings.roots)?;
        }
        builder.with_root_certificates(roots)
    };
    match settings.identity {
        None => Ok(builder.with_no_client_auth()),
        Some(pem) => {
            let (chain, key) = identity(pem)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Identity(e.to_string()))
        }
    }
}

/// `tls.insecureSkipVerify`: any certificate is accepted; signatures are still checked so that
/// the handshake itself stays sound.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
