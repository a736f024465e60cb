//! TLS through the inline proxy (`proxy.tls`): the client's TLS is terminated with the
//! configured certificate and the server leg is TLS of the proxy's own, so the proxy reads
//! (and judges) the plaintext and both wires stay encrypted.
//!
//! The proxy answers a client's SSLRequest with what the server answers it (asked first,
//! on the upstream connection): a server without TLS gets `N` passed on, so that
//! `sslmode=prefer` goes on in plaintext as it would have and `sslmode=require` fails as
//! it would have.
//!
//! Channel binding (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) binds the authentication
//! to the certificate the client saw. Through a terminating proxy that is the proxy's:
//! unless the proxy presents the server's own certificate (configured with the server's
//! certificate and key, as on a database host), the binding cannot match the server's,
//! so the proxy removes `-PLUS` from the server's offer. Authentication itself is passed
//! through untouched and never read. SCRAM's downgrade protection then refuses a client
//! that supports channel binding but was not offered it (libpq's default
//! `channel_binding=prefer` over TLS): such clients need `channel_binding=disable`, or the
//! proxy configured with the server's certificate (see docs/enforcement.md).

use std::{path::Path, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use crate::config::ProxyTlsConfig;

/// The proxy's TLS, loaded from the configuration.
pub struct ProxyTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
    /// The name server certificates are checked for (else the dialled address).
    pub server_name: Option<ServerName<'static>>,
    /// The certificate the proxy presents: when the server presents the same one (the
    /// proxy runs with the server's own certificate and key), channel binding works end
    /// to end and is left in the offer.
    pub leaf: CertificateDer<'static>,
}

pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

impl ProxyTls {
    pub fn load(cfg: &ProxyTlsConfig) -> Result<ProxyTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(&cfg.cert)?;
        let leaf = chain[0].clone();
        let key = PrivateKeyDer::from_pem_file(&cfg.key)
            .map_err(|e| format!("{}: {e}", cfg.key.display()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("{} and {}: {e}", cfg.cert.display(), cfg.key.display()))?;
        // What Postgres 17 asks of clients that negotiate TLS directly; harmless otherwise.
        server.alpn_protocols = vec![b"postgresql".to_vec()];
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let client = match &cfg.server_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
        };
        let server_name = match &cfg.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| format!("proxy.tls.server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(ProxyTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name,
            leaf,
        })
    }
}

/// The server leg without `server_ca`: encrypted, the server not verified (libpq's
/// `sslmode=require`). Signatures are still checked, so the session key is the server's.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
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

/// The SASL mechanisms of an AuthenticationSASL body (after its code) without those that
/// bind to the channel (`-PLUS`); None if there are none to remove or the body is not a
/// mechanism list.
pub fn without_channel_binding(mechanisms: &[u8]) -> Option<Vec<u8>> {
    let mut names: Vec<&[u8]> = Vec::new();
    let mut rest = mechanisms;
    loop {
        let end = rest.iter().position(|&b| b == 0)?;
        if end == 0 {
            break;
        }
        names.push(&rest[..end]);
        rest = &rest[end + 1..];
    }
    if !names.iter().any(|n| n.ends_with(b"-PLUS")) {
        return None;
    }
    let mut out = Vec::with_capacity(mechanisms.len());
    for n in names.iter().filter(|n| !n.ends_with(b"-PLUS")) {
        out.extend_from_slice(n);
        out.push(0);
    }
    out.push(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_is_removed_from_the_offer() {
        let offer = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(
            without_channel_binding(offer).as_deref(),
            Some(&b"SCRAM-SHA-256\0\0"[..])
        );
        assert_eq!(without_channel_binding(b"SCRAM-SHA-256\0\0"), None);
        assert_eq!(without_channel_binding(b"SCRAM-SHA-256"), None);
        assert_eq!(without_channel_binding(b""), None);
    }
}
