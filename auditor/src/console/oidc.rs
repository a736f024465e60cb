//! The console's OpenID Connect client: discovery, the authorization code flow with PKCE
//! (S256), and ID token checks (signature by the issuer's published keys, issuer,
//! audience, expiry, nonce).
//!
//! Only asymmetric signatures are accepted (RS256/384/512, ES256/384): `none` and the HMAC
//! algorithms never verify a token here.

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::http::{Client, HttpError};
use crate::{
    approvals::{Approver, OidcIdentity},
    config::OidcConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider {issuer}: {source}")]
    Http { issuer: String, source: HttpError },
    #[error("the identity provider's {what} does not read: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the identity provider answers {status} at its token endpoint: {body}")]
    Token { status: u16, body: String },
    #[error("the ID token is refused: {0}")]
    Refused(String),
}

/// What discovery says (the parts the flow uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

struct Cache {
    meta: Option<(Metadata, Instant)>,
    keys: Vec<Jwk>,
    keys_at: Option<Instant>,
}

/// The provider of `console.oidc`.
pub struct Provider {
    cfg: OidcConfig,
    secret: Option<zeroize::Zeroizing<String>>,
    http: Client,
    cache: Mutex<Cache>,
}

/// Metadata is read again after this long; keys when a token names one not seen.
const META_TTL: Duration = Duration::from_secs(3600);
/// The least time between two reads of the keys (a token naming unknown keys cannot make
/// the console hammer the provider).
const KEYS_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Clock skew allowed on `exp`, `iat` and `nbf`.
const SKEW: i64 = 60;

/// A login in progress: what the callback checks the provider's answer against.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub state: String,
    pub nonce: String,
    pub verifier: zeroize::Zeroizing<String>,
}

pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    b64().encode(b)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn b64_decode(s: &str) -> Result<Vec<u8>, String> {
    b64()
        .decode(s.trim_end_matches('='))
        .map_err(|e| e.to_string())
}

impl Default for Challenge {
    fn default() -> Self {
        Self::new()
    }
}

impl Challenge {
    pub fn new() -> Challenge {
        Challenge {
            state: random_token(),
            nonce: random_token(),
            verifier: zeroize::Zeroizing::new(random_token()),
        }
    }

    /// The S256 code challenge of the verifier.
    pub fn code_challenge(&self) -> String {
        b64().encode(Sha256::digest(self.verifier.as_bytes()))
    }
}

impl Provider {
    pub fn new(cfg: OidcConfig) -> Result<Provider, String> {
        let secret = match &cfg.client_secret_file {
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .map_err(|e| format!("client_secret_file {}: {e}", p.display()))?;
                let s = s.trim().to_string();
                if s.is_empty() {
                    return Err(format!("client_secret_file {}: empty", p.display()));
                }
                Some(zeroize::Zeroizing::new(s))
            }
            None => None,
        };
        let http = Client::new(cfg.ca_file.as_deref())?;
        Ok(Provider {
            cfg,
            secret,
            http,
            cache: Mutex::new(Cache {
                meta: None,
                keys: Vec::new(),
                keys_at: None,
            }),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    fn http_err(&self, source: HttpError) -> OidcError {
        OidcError::Http {
            issuer: self.cfg.issuer.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Discovery, cached for an hour.
    pub async fn metadata(&self) -> Result<Metadata, OidcError> {
        if let Some((m, at)) = &self.lock().meta {
            if at.elapsed() < META_TTL {
                return Ok(m.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let (status, body) = self.http.get(&url).await.map_err(|e| self.http_err(e))?;
        if status != 200 {
            return Err(OidcError::Malformed {
                what: "discovery document",
                detail: format!("{url} answers {status}"),
            });
        }
        let meta: Metadata = serde_json::from_slice(&body).map_err(|e| OidcError::Malformed {
            what: "discovery document",
            detail: format!("{url}: {e}"),
        })?;
        // The document must be the issuer's own (OpenID Connect Discovery 1.0, 4.3).
        if meta.issuer.trim_end_matches('/') != self.cfg.issuer.trim_end_matches('/') {
            return Err(OidcError::Malformed {
                what: "discovery document",
                detail: format!(
                    "it names issuer {}, not the configured {}",
                    meta.issuer, self.cfg.issuer
                ),
            });
        }
        if let Some(methods) = &meta.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                return Err(OidcError::Malformed {
                    what: "discovery document",
                    detail: "the provider does not support PKCE with S256".into(),
                });
            }
        }
        self.lock().meta = Some((meta.clone(), Instant::now()));
        Ok(meta)
    }

    /// Where the browser goes to log in.
    pub fn authorize_url(&self, meta: &Metadata, redirect_uri: &str, c: &Challenge) -> String {
        let scopes = self
            .cfg
            .scopes
            .clone()
            .unwrap_or_else(|| {
                ["openid", "email", "profile", "groups"]
                    .map(String::from)
                    .to_vec()
            })
            .join(" ");
        let scopes = if scopes.split(' ').any(|s| s == "openid") {
            scopes
        } else {
            format!("openid {scopes}")
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scopes)
            .append_pair("state", &c.state)
            .append_pair("nonce", &c.nonce)
            .append_pair("code_challenge", &c.code_challenge())
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if meta.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}{query}", meta.authorization_endpoint)
    }

    /// Trades the code for tokens and checks the ID token: who logged in.
    pub async fn exchange(
        &self,
        code: &str,
        c: &Challenge,
        redirect_uri: &str,
    ) -> Result<Approver, OidcError> {
        let meta = self.metadata().await?;
        let body = zeroize::Zeroizing::new(
            form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "authorization_code")
                .append_pair("code", code)
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("client_id", &self.cfg.client_id)
                .append_pair("code_verifier", &c.verifier)
                .finish(),
        );
        let mut headers = Vec::new();
        if let Some(secret) = &self.secret {
            // client_secret_basic (RFC 6749 2.3.1: each part form-encoded first).
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(&self.cfg.client_id),
                enc(secret)
            ));
            headers.push(("authorization", format!("Basic {basic}")));
        }
        let (status, answer) = self
            .http
            .post_form(&meta.token_endpoint, &headers, body.as_bytes())
            .await
            .map_err(|e| self.http_err(e))?;
        if status != 200 {
            // The error and its description only: never a token.
            let detail = serde_json::from_slice::<Value>(&answer)
                .ok()
                .map(|v| {
                    format!(
                        "{} {}",
                        v["error"].as_str().unwrap_or(""),
                        v["error_description"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_default();
            return Err(OidcError::Token {
                status,
                body: detail.trim().chars().take(300).collect(),
            });
        }
        let tokens: Value = serde_json::from_slice(&answer).map_err(|e| OidcError::Malformed {
            what: "token response",
            detail: e.to_string(),
        })?;
        let id_token = tokens["id_token"]
            .as_str()
            .ok_or_else(|| OidcError::Malformed {
                what: "token response",
                detail: "no id_token in it (is `openid` among the scopes?)".into(),
            })?;
        let claims = self.verify(id_token, &meta).await?;
        self.check_claims(&claims, &meta, &c.nonce, now_s())?;
        self.identity(&claims)
    }

    async fn keys(&self, meta: &Metadata, refresh: bool) -> Result<Vec<Jwk>, OidcError> {
        {
            let c = self.lock();
            let fresh = c.keys_at.is_some_and(|at| at.elapsed() < KEYS_MIN_INTERVAL);
            if c.keys_at.is_some() && (!refresh || fresh) {
                return Ok(c.keys.clone());
            }
        }
        let (status, body) = self
            .http
            .get(&meta.jwks_uri)
            .await
            .map_err(|e| self.http_err(e))?;
        if status != 200 {
            return Err(OidcError::Malformed {
                what: "keys",
                detail: format!("{} answers {status}", meta.jwks_uri),
            });
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| OidcError::Malformed {
            what: "keys",
            detail: format!("{}: {e}", meta.jwks_uri),
        })?;
        let mut c = self.lock();
        c.keys = set.keys;
        c.keys_at = Some(Instant::now());
        Ok(c.keys.clone())
    }

    async fn verify(&self, token: &str, meta: &Metadata) -> Result<Map<String, Value>, OidcError> {
        let keys = self.keys(meta, false).await?;
        match verify_jwt(token, &keys) {
            Err(Unverified::NoKey(_)) => {
                // Keys roll over: read them again (at most every KEYS_MIN_INTERVAL).
                let keys = self.keys(meta, true).await?;
                verify_jwt(token, &keys).map_err(|e| OidcError::Refused(e.to_string()))
            }
            r => r.map_err(|e| OidcError::Refused(e.to_string())),
        }
    }

    fn check_claims(
        &self,
        claims: &Map<String, Value>,
        meta: &Metadata,
        nonce: &str,
        now: i64,
    ) -> Result<(), OidcError> {
        let refused = |s: String| Err(OidcError::Refused(s));
        if claims.get("iss").and_then(Value::as_str) != Some(meta.issuer.as_str()) {
            return refused(format!(
                "issued by {}, not {}",
                claims.get("iss").unwrap_or(&Value::Null),
                meta.issuer
            ));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.cfg.client_id,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(&self.cfg.client_id)),
            _ => false,
        };
        if !aud_ok {
            return refused(format!("not for client {}", self.cfg.client_id));
        }
        if let Some(azp) = claims.get("azp").and_then(Value::as_str) {
            if azp != self.cfg.client_id {
                return refused(format!("authorized for {azp}, not this client"));
            }
        }
        match claims.get("exp").and_then(Value::as_i64) {
            Some(exp) if exp + SKEW >= now => {}
            Some(_) => return refused("expired".into()),
            None => return refused("no `exp`".into()),
        }
        if let Some(iat) = claims.get("iat").and_then(Value::as_i64) {
            if iat - SKEW > now {
                return refused("issued in the future (are the clocks right?)".into());
            }
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64) {
            if nbf - SKEW > now {
                return refused("not valid yet".into());
            }
        }
        let got = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
        if !constant_eq(got.as_bytes(), nonce.as_bytes()) {
            return refused("its nonce is not this login's".into());
        }
        Ok(())
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Approver, OidcError> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OidcError::Refused("no `sub`".into()))?;
        let name_claim = self.cfg.username_claim.as_deref().unwrap_or("email");
        let name = claims
            .get(name_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                OidcError::Refused(format!(
                    "no `{name_claim}` claim (console.oidc.username_claim; is its scope asked for?)"
                ))
            })?;
        if name_claim == "email" && claims.get("email_verified") == Some(&Value::Bool(false)) {
            return Err(OidcError::Refused(format!(
                "the provider has not verified the email {name}"
            )));
        }
        let groups_claim = self.cfg.groups_claim.as_deref().unwrap_or("groups");
        let groups = match claims.get(groups_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(g)) => vec![g.clone()],
            _ => Vec::new(),
        };
        let local_user = self
            .cfg
            .local_user_claim
            .as_ref()
            .and_then(|c| claims.get(c).and_then(Value::as_str).map(str::to_string));
        Ok(Approver::of_oidc(
            name.to_string(),
            groups,
            OidcIdentity {
                issuer: self.cfg.issuer.clone(),
                subject: sub.to_string(),
                local_user,
            },
        ))
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Equality in time independent of where the inputs differ (tokens, nonces).
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum Unverified {
    #[error("not a signed JWT: {0}")]
    Malformed(String),
    #[error("signed with {0}, which is not accepted (RS256/384/512, ES256/384 are)")]
    Algorithm(String),
    #[error("no published key of the provider's verifies it ({0})")]
    NoKey(String),
    #[error("its signature does not verify")]
    Signature,
}

/// The claims of a JWT whose signature one of `keys` verifies.
fn verify_jwt(token: &str, keys: &[Jwk]) -> Result<Map<String, Value>, Unverified> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Unverified::Malformed("not three parts".into()));
    };
    let header: Value = b64_decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Unverified::Malformed("its header".into()))?;
    let alg = header["alg"].as_str().unwrap_or("none").to_string();
    let kid = header["kid"].as_str();
    let sig = b64_decode(s).map_err(|e| Unverified::Malformed(format!("its signature: {e}")))?;
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    use ring::signature as rs;
    let (kty, rsa, ec): (
        &str,
        Option<&'static rs::RsaParameters>,
        Option<(&'static rs::EcdsaVerificationAlgorithm, &str)>,
    ) = match alg.as_str() {
        "RS256" => ("RSA", Some(&rs::RSA_PKCS1_2048_8192_SHA256), None),
        "RS384" => ("RSA", Some(&rs::RSA_PKCS1_2048_8192_SHA384), None),
        "RS512" => ("RSA", Some(&rs::RSA_PKCS1_2048_8192_SHA512), None),
        "ES256" => ("EC", None, Some((&rs::ECDSA_P256_SHA256_FIXED, "P-256"))),
        "ES384" => ("EC", None, Some((&rs::ECDSA_P384_SHA384_FIXED, "P-384"))),
        other => return Err(Unverified::Algorithm(other.to_string())),
    };
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|k| k.kty == kty && k.use_.as_deref().is_none_or(|u| u == "sig"))
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if candidates.is_empty() {
        return Err(Unverified::NoKey(format!(
            "{alg}, key id {}",
            kid.unwrap_or("(none)")
        )));
    }
    for k in candidates {
        let ok = if let Some(params) = rsa {
            let (Some(n), Some(e)) = (
                k.n.as_deref().and_then(|n| b64_decode(n).ok()),
                k.e.as_deref().and_then(|e| b64_decode(e).ok()),
            ) else {
                continue;
            };
            rs::RsaPublicKeyComponents { n: &n, e: &e }
                .verify(params, signed, &sig)
                .is_ok()
        } else if let Some((alg, crv)) = ec {
            if k.crv.as_deref() != Some(crv) {
                continue;
            }
            let (Some(x), Some(y)) = (
                k.x.as_deref().and_then(|x| b64_decode(x).ok()),
                k.y.as_deref().and_then(|y| b64_decode(y).ok()),
            ) else {
                continue;
            };
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            rs::UnparsedPublicKey::new(alg, &point)
                .verify(signed, &sig)
                .is_ok()
        } else {
            false
        };
        if ok {
            let payload = b64_decode(p).map_err(|e| Unverified::Malformed(e.to_string()))?;
            return match serde_json::from_slice::<Value>(&payload) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(Unverified::Malformed(
                    "its claims are not a JSON object".into(),
                )),
            };
        }
    }
    Err(Unverified::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn es256() -> (EcdsaKeyPair, Jwk) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some("k1".into()),
            use_: Some("sig".into()),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: Some(b64().encode(&public[1..33])),
            y: Some(b64().encode(&public[33..65])),
        };
        (pair, jwk)
    }

    fn sign(pair: &EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let rng = ring::rand::SystemRandom::new();
        let input = format!(
            "{}.{}",
            b64().encode(header.to_string()),
            b64().encode(claims.to_string())
        );
        let sig = pair.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64().encode(sig.as_ref()))
    }

    fn provider() -> Provider {
        Provider::new(OidcConfig {
            issuer: "https://login.example.com".into(),
            client_id: "auditor".into(),
            client_secret_file: None,
            scopes: None,
            username_claim: None,
            groups_claim: None,
            local_user_claim: Some("preferred_username".into()),
            ca_file: None,
        })
        .unwrap()
    }

    fn meta() -> Metadata {
        Metadata {
            issuer: "https://login.example.com".into(),
            authorization_endpoint: "https://login.example.com/auth".into(),
            token_endpoint: "https://login.example.com/token".into(),
            jwks_uri: "https://login.example.com/keys".into(),
            code_challenge_methods_supported: None,
        }
    }

    #[test]
    fn es256_tokens_verify_and_tampering_does_not() {
        let (pair, jwk) = es256();
        let claims = serde_json::json!({"sub": "u1", "email": "alice@example.com"});
        let t = sign(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k1"}),
            &claims,
        );
        let got = verify_jwt(&t, std::slice::from_ref(&jwk)).unwrap();
        assert_eq!(got["email"], "alice@example.com");
        // Claims changed after signing.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64().encode(
                serde_json::json!({"sub": "u1", "email": "mallory@example.com"}).to_string()
            ),
            parts[2]
        );
        assert_eq!(
            verify_jwt(&forged, std::slice::from_ref(&jwk)),
            Err(Unverified::Signature)
        );
        // Another key, same key id.
        let (other, _) = es256();
        let t2 = sign(
            &other,
            &serde_json::json!({"alg": "ES256", "kid": "k1"}),
            &claims,
        );
        assert_eq!(
            verify_jwt(&t2, std::slice::from_ref(&jwk)),
            Err(Unverified::Signature)
        );
        // An unknown key id asks for the keys again.
        let t3 = sign(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k9"}),
            &claims,
        );
        assert!(matches!(
            verify_jwt(&t3, std::slice::from_ref(&jwk)),
            Err(Unverified::NoKey(_))
        ));
    }

    #[test]
    fn unsigned_and_hmac_tokens_never_verify() {
        let (_, jwk) = es256();
        let body = b64().encode(r#"{"sub":"u1"}"#);
        for alg in ["none", "HS256", "None"] {
            let h = b64().encode(format!(r#"{{"alg":"{alg}"}}"#));
            let t = format!("{h}.{body}.");
            assert!(
                matches!(
                    verify_jwt(&t, std::slice::from_ref(&jwk)),
                    Err(Unverified::Algorithm(_))
                ),
                "{alg}"
            );
        }
        assert!(matches!(
            verify_jwt("a.b", &[]),
            Err(Unverified::Malformed(_))
        ));
        assert!(matches!(verify_jwt("", &[]), Err(Unverified::Malformed(_))));
    }

    /// A token of an RSA key made with `openssl genrsa 2048` for this test (its public
    /// half below); the private key is not kept.
    #[test]
    fn rs256_tokens_verify() {
        let jwk: Jwk = serde_json::from_str(RSA_JWK).unwrap();
        let claims = verify_jwt(RSA_TOKEN, std::slice::from_ref(&jwk)).unwrap();
        assert_eq!(claims["sub"], "rsa-test");
        let mut forged = RSA_TOKEN.to_string();
        forged.pop();
        forged.push(if RSA_TOKEN.ends_with('A') { 'B' } else { 'A' });
        assert!(verify_jwt(&forged, std::slice::from_ref(&jwk)).is_err());
    }

    const RSA_JWK: &str = include_str!("testdata/rsa.jwk.json");
    const RSA_TOKEN: &str = include_str!("testdata/rsa.jwt");

    #[test]
    fn claims_are_checked() {
        let p = provider();
        let m = meta();
        let now = 1_800_000_000;
        let good = serde_json::json!({
            "iss": "https://login.example.com", "aud": ["auditor", "other"], "azp": "auditor",
            "exp": now + 300, "iat": now, "nonce": "n1", "sub": "u1",
            "email": "alice@example.com", "email_verified": true,
            "groups": ["dba", "sre"], "preferred_username": "alice",
        });
        let obj = |v: &Value| v.as_object().unwrap().clone();
        assert!(p.check_claims(&obj(&good), &m, "n1", now).is_ok());
        let a = p.identity(&obj(&good)).unwrap();
        assert_eq!(a.display(), "oidc:alice@example.com");
        assert_eq!(a.groups, vec!["dba", "sre"]);
        assert_eq!(a.oidc.unwrap().local_user.as_deref(), Some("alice"));
        for (field, value, nonce) in [
            ("iss", serde_json::json!("https://evil.example.com"), "n1"),
            ("aud", serde_json::json!("someone-else"), "n1"),
            ("azp", serde_json::json!("someone-else"), "n1"),
            ("exp", serde_json::json!(now - 3600), "n1"),
            ("iat", serde_json::json!(now + 3600), "n1"),
            ("nonce", serde_json::json!("n1"), "n2"),
        ] {
            let mut c = obj(&good);
            c.insert(field.into(), value);
            assert!(p.check_claims(&c, &m, nonce, now).is_err(), "{field}");
        }
        let mut c = obj(&good);
        c.insert("email_verified".into(), Value::Bool(false));
        assert!(p.identity(&c).is_err());
        c.remove("email");
        c.remove("email_verified");
        assert!(p.identity(&c).is_err());
    }

    #[test]
    fn the_login_url_asks_for_pkce() {
        let p = provider();
        let c = Challenge::new();
        let url = p.authorize_url(&meta(), "https://auditor.example.com/callback", &c);
        assert!(url.starts_with("https://login.example.com/auth?response_type=code&"));
        assert!(url.contains("code_challenge_method=S256"));
        assert!(url.contains(&format!("code_challenge={}", c.code_challenge())));
        assert!(!url.contains(c.verifier.as_str()));
        assert!(url.contains("scope=openid+email+profile+groups"));
        // RFC 7636 appendix B.
        let v = Challenge {
            state: String::new(),
            nonce: String::new(),
            verifier: zeroize::Zeroizing::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into()),
        };
        assert_eq!(
            v.code_challenge(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
