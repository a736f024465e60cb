//! A small HTTP/1.1 client for the identity provider (discovery, keys, the token
//! endpoint) and the approvals webhook: one connection per request, HTTPS checked against the system's CAs (and
//! `console.oidc.ca_file`), bounded in time and size.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// A whole exchange: connect, TLS, request, answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (discovery, keys and tokens are a few KiB).
const MAX_ANSWER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http(s) URL")]
    Url(String),
    #[error("{url}: {detail}")]
    Io { url: String, detail: String },
    #[error("{0}: no answer within 10 s")]
    Timeout(String),
}

pub struct Client {
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    pub fn new(ca_file: Option<&Path>) -> Result<Client, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if let Some(p) = ca_file {
            for c in crate::proxy::tls::certs(p)? {
                roots
                    .add(c)
                    .map_err(|e| format!("ca_file {}: {e}", p.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), HttpError> {
        self.send(Method::GET, url, &[], None).await
    }

    /// POSTs a JSON document (a webhook).
    pub async fn post_json(&self, url: &str, body: &[u8]) -> Result<(u16, Bytes), HttpError> {
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/json".to_string())],
            Some(body),
        )
        .await
    }

    pub async fn post_form(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<(u16, Bytes), HttpError> {
        self.send(Method::POST, url, headers, Some(body)).await
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<(u16, Bytes), HttpError> {
        match tokio::time::timeout(TIMEOUT, self.exchange(method, url, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(url.to_string())),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<(u16, Bytes), HttpError> {
        let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(HttpError::Url(url.to_string())),
        };
        let host = uri
            .host()
            .ok_or_else(|| HttpError::Url(url.to_string()))?
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let io_err = |detail: String| HttpError::Io {
            url: url.to_string(),
            detail,
        };
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| io_err(format!("connect: {e}")))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or(host.clone());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("user-agent", concat!("auditor/", env!("CARGO_PKG_VERSION")))
            .header("accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| io_err(e.to_string()))?;
        if https {
            let name =
                ServerName::try_from(bare).map_err(|e| io_err(format!("server name: {e}")))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| io_err(format!("TLS: {e}")))?;
            round_trip(TokioIo::new(tls), req).await.map_err(io_err)
        } else {
            round_trip(TokioIo::new(tcp), req).await.map_err(io_err)
        }
    }
}

async fn round_trip<T>(io: T, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}
