//! The proxy's own login to Postgres for a workload whose policy holds a credential
//! (`credential:` in an `enforce` policy): the workload connects with no password, the
//! proxy replaces the user name of its startup packet by the credential's role and
//! answers the server's authentication itself (SCRAM-SHA-256, RFC 5802/7677, without
//! channel binding; or a cleartext password request, which Postgres makes only where
//! its pg_hba says `password`). The client is told only that authentication succeeded.
//!
//! The password is read from its file at each new session (a rotated file serves the next
//! session; open sessions are not disturbed), held only until the server accepted it, and
//! wiped then. It never reaches a record, an event or a log line: nothing the proxy sends
//! the server during the login is recorded, and errors name the file, never its content.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{pg::tokenizer::frame, policy::model::Credential};

type HmacSha256 = Hmac<Sha256>;

/// Reads the credential's password: the first line of its file, or of its Secret's key.
pub fn read_password(
    c: &Credential,
    secrets: &crate::workload::kubernetes::SecretStore,
) -> Result<Zeroizing<String>, String> {
    match (&c.password_file, &c.secret) {
        (Some(file), _) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?,
            );
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                return Err(format!("{}: empty", file.display()));
            }
            Ok(Zeroizing::new(line.to_string()))
        }
        (None, Some(secret)) => secrets.password(secret),
        (None, None) => Err("the credential names no password_file and no secret".into()),
    }
}

/// Where the login stands.
enum Step {
    /// Waiting for the server's authentication request.
    Start,
    /// SCRAM: the client-first message sent; its bare part and nonce kept.
    ScramFirst {
        first_bare: String,
        nonce: String,
    },
    /// SCRAM: the proof sent; the server's signature expected.
    ScramFinal {
        server_signature: Vec<u8>,
    },
    /// A password sent (cleartext request); the server's verdict expected.
    Sent,
    Done,
}

pub struct Login {
    password: Option<Zeroizing<String>>,
    step: Step,
}

/// What the relay does with an authentication request of the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this message (a complete frame) to the server; nothing to the client.
    Server(Vec<u8>),
    /// Authentication succeeded: pass the server's AuthenticationOk on to the client.
    Ok,
    /// Give up: this message for the client (the connection ends).
    Fail(String),
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256, one block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<Vec<u8>> {
    let mut salt1 = salt.to_vec();
    salt1.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &salt1);
    let mut out = Zeroizing::new(u.clone());
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, b) in out.iter_mut().zip(&u) {
            *o ^= b;
        }
    }
    out
}

/// Postgres's cap on SCRAM iterations it would itself accept is far above this; a server
/// asking for more is refused rather than letting one login burn seconds of CPU.
const MAX_ITERATIONS: u32 = 1 << 20;

impl Login {
    pub fn new(password: Zeroizing<String>) -> Login {
        Login {
            password: Some(password),
            step: Step::Start,
        }
    }

    pub fn done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    fn password(&self) -> &[u8] {
        self.password.as_ref().map(|p| p.as_bytes()).unwrap_or(b"")
    }

    /// An Authentication message of the server (its body).
    pub fn on_request(&mut self, body: &[u8]) -> Answer {
        if body.len() < 4 {
            return Answer::Fail("malformed authentication request".into());
        }
        let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let data = &body[4..];
        match (code, &self.step) {
            (0, Step::Sent) | (0, Step::ScramFinal { .. }) => {
                self.step = Step::Done;
                self.password = None;
                Answer::Ok
            }
            (0, _) => {
                // The server trusted the connection without asking: fine, nothing sent.
                self.step = Step::Done;
                self.password = None;
                Answer::Ok
            }
            (3, Step::Start) => {
                let mut body = self.password().to_vec();
                body.push(0);
                self.step = Step::Sent;
                let out = frame(b'p', &body);
                zeroize::Zeroize::zeroize(&mut body);
                Answer::Server(out)
            }
            (10, Step::Start) => {
                let offered = data.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                if !offered {
                    return Answer::Fail(
                        "the server offers no SCRAM-SHA-256 for the credential's role".into(),
                    );
                }
                let nonce = B64.encode(rand::random::<[u8; 18]>());
                let first_bare = format!("n=,r={nonce}");
                let first = format!("n,,{first_bare}");
                let mut body = b"SCRAM-SHA-256\0".to_vec();
                body.extend_from_slice(&(first.len() as u32).to_be_bytes());
                body.extend_from_slice(first.as_bytes());
                self.step = Step::ScramFirst { first_bare, nonce };
                Answer::Server(frame(b'p', &body))
            }
            (11, Step::ScramFirst { first_bare, nonce }) => {
                let Ok(server_first) = std::str::from_utf8(data) else {
                    return Answer::Fail("malformed SCRAM server-first message".into());
                };
                let attr = |k: &str| {
                    server_first
                        .split(',')
                        .find_map(|a| a.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                };
                let (Some(r), Some(s), Some(i)) = (attr("r"), attr("s"), attr("i")) else {
                    return Answer::Fail("malformed SCRAM server-first message".into());
                };
                if !r.starts_with(nonce.as_str()) || r.len() <= nonce.len() {
                    return Answer::Fail("the server's SCRAM nonce does not extend ours".into());
                }
                let Ok(salt) = B64.decode(s) else {
                    return Answer::Fail("malformed SCRAM salt".into());
                };
                let Some(iterations) = i
                    .parse::<u32>()
                    .ok()
                    .filter(|i| (1..=MAX_ITERATIONS).contains(i))
                else {
                    return Answer::Fail(format!("unacceptable SCRAM iteration count {i:?}"));
                };
                let salted = salted_password(self.password(), &salt, iterations);
                let client_key = hmac(&salted, b"Client Key");
                let stored_key = Sha256::digest(&client_key);
                let without_proof = format!("c=biws,r={r}");
                let auth_message = format!("{first_bare},{server_first},{without_proof}");
                let client_signature = hmac(&stored_key, auth_message.as_bytes());
                let proof: Vec<u8> = client_key
                    .iter()
                    .zip(&client_signature)
                    .map(|(a, b)| a ^ b)
                    .collect();
                let server_key = hmac(&salted, b"Server Key");
                let server_signature = hmac(&server_key, auth_message.as_bytes());
                let last = format!("{without_proof},p={}", B64.encode(proof));
                self.step = Step::ScramFinal { server_signature };
                Answer::Server(frame(b'p', last.as_bytes()))
            }
            (12, Step::ScramFinal { server_signature }) => {
                let verifier = std::str::from_utf8(data)
                    .ok()
                    .and_then(|t| t.split(',').find_map(|a| a.strip_prefix("v=")))
                    .and_then(|v| B64.decode(v).ok());
                if verifier.as_deref() != Some(server_signature.as_slice()) {
                    return Answer::Fail(
                        "the server could not prove it knows the credential (SCRAM server signature)"
                            .into(),
                    );
                }
                // AuthenticationOk follows.
                Answer::Server(Vec::new())
            }
            (5, _) => Answer::Fail(
                "the server asks for MD5 authentication for the credential's role; the proxy \
                 logs in with SCRAM-SHA-256 (store the role's password with \
                 password_encryption = scram-sha-256)"
                    .into(),
            ),
            (code, _) => Answer::Fail(format!(
                "the server asks for an authentication the proxy cannot make (request {code})"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example, with its nonce.
    #[test]
    fn scram_matches_the_rfc_example() {
        let mut login = Login::new(Zeroizing::new("pencil".to_string()));
        login.step = Step::ScramFirst {
            first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            nonce: "rOprNGfwEbeRWgbNEkqO".into(),
        };
        let server_first =
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut body = 11u32.to_be_bytes().to_vec();
        body.extend_from_slice(server_first.as_bytes());
        let Answer::Server(msg) = login.on_request(&body) else {
            panic!("no answer");
        };
        let text = String::from_utf8(msg[5..].to_vec()).unwrap();
        // The RFC's client-final (its gs2 header is "n,,", like ours).
        assert_eq!(
            text,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let mut fin = 12u32.to_be_bytes().to_vec();
        fin.extend_from_slice(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert_eq!(login.on_request(&fin), Answer::Server(Vec::new()));
        assert_eq!(login.on_request(&0u32.to_be_bytes()), Answer::Ok);
        assert!(login.done() && login.password.is_none());
    }

    #[test]
    fn a_wrong_server_signature_and_md5_fail() {
        let mut login = Login::new(Zeroizing::new("pw".to_string()));
        let mut req = 10u32.to_be_bytes().to_vec();
        req.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert!(matches!(login.on_request(&req), Answer::Server(_)));
        let mut login = Login::new(Zeroizing::new("pw".to_string()));
        let mut md5 = 5u32.to_be_bytes().to_vec();
        md5.extend_from_slice(b"salt");
        assert!(matches!(login.on_request(&md5), Answer::Fail(m) if m.contains("MD5")));
        let mut login = Login::new(Zeroizing::new("pencil".to_string()));
        login.step = Step::ScramFinal {
            server_signature: vec![1; 32],
        };
        let mut fin = 12u32.to_be_bytes().to_vec();
        fin.extend_from_slice(b"v=AAAA");
        assert!(matches!(login.on_request(&fin), Answer::Fail(_)));
    }
}
