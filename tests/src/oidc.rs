//! A small OpenID Connect provider for the console tests, on loopback: discovery, an
//! authorization page with a sign-in link (the browser clicks it), a token endpoint that
//! checks the client secret, the code (once) and PKCE's S256 verifier, and ES256-signed ID
//! tokens with the keys it publishes. Nothing of it is the auditor's code.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use base64::Engine as _;
use ring::{
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "auditor-console";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

struct Auth {
    redirect_uri: String,
    state: String,
    nonce: String,
    challenge: String,
}

struct State {
    /// The person who signs in next: their claims.
    person: Value,
    tx: HashMap<String, Auth>,
    codes: HashMap<String, (Auth, Value)>,
    /// Token requests answered with a token.
    pub tokens_issued: u32,
}

pub struct Issuer {
    pub port: u16,
    pub url: String,
    pub secret: String,
    state: Arc<Mutex<State>>,
}

fn random() -> String {
    let mut b = [0u8; 24];
    SystemRandom::new().fill(&mut b).unwrap();
    b64().encode(b)
}

impl Issuer {
    pub fn start() -> Result<Issuer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let url = format!("http://127.0.0.1:{port}");
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = Arc::new(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let secret = random();
        let state = Arc::new(Mutex::new(State {
            person: json!({}),
            tx: HashMap::new(),
            codes: HashMap::new(),
            tokens_issued: 0,
        }));
        let (u, s, st) = (url.clone(), secret.clone(), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (u, s, st, key) = (u.clone(), s.clone(), st.clone(), key.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &u, &s, &st, &key);
                });
            }
        });
        Ok(Issuer {
            port,
            url,
            secret,
            state,
        })
    }

    /// Who signs in from now on: `sub`, `email`, `groups`, `preferred_username`.
    pub fn set_person(&self, sub: &str, email: &str, groups: &[&str], login: &str) {
        self.state.lock().unwrap().person = json!({
            "sub": sub, "email": email, "email_verified": true, "groups": groups,
            "preferred_username": login, "name": email,
        });
    }

    pub fn tokens_issued(&self) -> u32 {
        self.state.lock().unwrap().tokens_issued
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &str) -> Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    Ok(())
}

fn serve(
    mut stream: TcpStream,
    url: &str,
    secret: &str,
    state: &Mutex<State>,
    key: &EcdsaKeyPair,
) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let q: HashMap<String, String> = form_urlencoded_parse(query.as_bytes());
    let json_h = vec![("Content-Type", "application/json".to_string())];
    match (method.as_str(), path) {
        ("GET", "/.well-known/openid-configuration") => respond(
            &mut stream,
            "200 OK",
            &json_h,
            &json!({
                "issuer": url,
                "authorization_endpoint": format!("{url}/authorize"),
                "token_endpoint": format!("{url}/token"),
                "jwks_uri": format!("{url}/jwks"),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "code_challenge_methods_supported": ["S256"],
            })
            .to_string(),
        ),
        ("GET", "/jwks") => {
            let p = key.public_key().as_ref();
            respond(
                &mut stream,
                "200 OK",
                &json_h,
                &json!({"keys": [{
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "test-1",
                    "x": b64().encode(&p[1..33]), "y": b64().encode(&p[33..65]),
                }]})
                .to_string(),
            )
        }
        ("GET", "/authorize") => {
            let ok = q.get("response_type").map(String::as_str) == Some("code")
                && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                && q.get("code_challenge_method").map(String::as_str) == Some("S256")
                && q.get("code_challenge").is_some_and(|c| c.len() == 43)
                && q.get("scope")
                    .is_some_and(|s| s.split(' ').any(|x| x == "openid"));
            if !ok {
                return respond(
                    &mut stream,
                    "400 Bad Request",
                    &[],
                    "bad authorization request",
                );
            }
            let tx = random();
            let who = state.lock().unwrap().person["email"]
                .as_str()
                .unwrap_or("")
                .to_string();
            state.lock().unwrap().tx.insert(
                tx.clone(),
                Auth {
                    redirect_uri: q["redirect_uri"].clone(),
                    state: q.get("state").cloned().unwrap_or_default(),
                    nonce: q.get("nonce").cloned().unwrap_or_default(),
                    challenge: q["code_challenge"].clone(),
                },
            );
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/html; charset=utf-8".to_string())],
                &format!(
                    "<!doctype html><title>Test identity provider</title>\
                     <h1>Test identity provider</h1><p>Sign in to auditor-console as {who}</p>\
                     <a id=\"signin\" href=\"/approve?tx={tx}\">Sign in</a>"
                ),
            )
        }
        ("GET", "/approve") => {
            let mut st = state.lock().unwrap();
            let Some(auth) = q.get("tx").and_then(|t| st.tx.remove(t)) else {
                drop(st);
                return respond(&mut stream, "400 Bad Request", &[], "unknown transaction");
            };
            let code = random();
            let to = format!(
                "{}?code={code}&state={}",
                auth.redirect_uri,
                form_urlencoded_encode(&auth.state)
            );
            let person = st.person.clone();
            st.codes.insert(code, (auth, person));
            drop(st);
            respond(&mut stream, "302 Found", &[("Location", to)], "")
        }
        ("POST", "/token") => {
            let f = form_urlencoded_parse(&body);
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{secret}"))
            );
            let err = |s: &mut TcpStream, e: &str| {
                respond(
                    s,
                    "400 Bad Request",
                    &[("Content-Type", "application/json".to_string())],
                    &json!({"error": e}).to_string(),
                )
            };
            if headers.get("authorization") != Some(&basic) {
                return respond(
                    &mut stream,
                    "401 Unauthorized",
                    &json_h,
                    &json!({"error": "invalid_client"}).to_string(),
                );
            }
            if f.get("grant_type").map(String::as_str) != Some("authorization_code") {
                return err(&mut stream, "unsupported_grant_type");
            }
            let found = f
                .get("code")
                .and_then(|c| state.lock().unwrap().codes.remove(c));
            let Some((auth, person)) = found else {
                return err(&mut stream, "invalid_grant");
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let challenge = b64().encode(Sha256::digest(verifier.as_bytes()));
            if challenge != auth.challenge || f.get("redirect_uri") != Some(&auth.redirect_uri) {
                return err(&mut stream, "invalid_grant");
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let mut claims = person;
            claims["iss"] = json!(url);
            claims["aud"] = json!(CLIENT_ID);
            claims["iat"] = json!(now);
            claims["exp"] = json!(now + 300);
            claims["nonce"] = json!(auth.nonce);
            let input = format!(
                "{}.{}",
                b64().encode(json!({"alg": "ES256", "kid": "test-1", "typ": "JWT"}).to_string()),
                b64().encode(claims.to_string())
            );
            let sig = key
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let id_token = format!("{input}.{}", b64().encode(sig.as_ref()));
            state.lock().unwrap().tokens_issued += 1;
            respond(
                &mut stream,
                "200 OK",
                &json_h,
                &json!({"access_token": random(), "token_type": "Bearer", "expires_in": 300,
                        "id_token": id_token})
                .to_string(),
            )
        }
        _ => respond(&mut stream, "404 Not Found", &[], "not found"),
    }
}

fn form_urlencoded_parse(b: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(b).into_owned().collect()
}

fn form_urlencoded_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
