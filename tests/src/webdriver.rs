//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`): a
//! small blocking client of the W3C protocol, enough to sign in, click, read text, wait
//! for something to appear without reloading, and save screenshots.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// Where Debian puts them.
pub fn available() -> Option<String> {
    for (bin, pkg) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} is missing (apt-get install {pkg})"));
        }
    }
    None
}

fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // The answer's length from its head (chromedriver keeps connections open whatever
    // the request says).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, body) = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("chromedriver closed the connection");
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|l| l.trim().parse::<usize>().ok());
        let head_len = head.len() + 4;
        match length {
            Some(len) if raw.len() >= head_len + len => {
                break (
                    head.to_string(),
                    String::from_utf8_lossy(&raw[head_len..head_len + len]).into_owned(),
                );
            }
            Some(_) => continue,
            None if lower.contains("transfer-encoding: chunked") => {
                if !rest.contains("\r\n0\r\n") && !rest.starts_with("0\r\n") {
                    continue;
                }
                let mut out = String::new();
                let mut rest = rest;
                while let Some((size, after)) = rest.split_once("\r\n") {
                    let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                    if n == 0 || after.len() < n {
                        break;
                    }
                    out.push_str(&after[..n]);
                    rest = after[n..].trim_start_matches("\r\n");
                }
                break (head.to_string(), out);
            }
            None => bail!("a WebDriver answer without a length: {head}"),
        }
    };
    let v: Value =
        serde_json::from_str(&body).with_context(|| format!("WebDriver answer {head}: {body}"))?;
    if let Some(e) = v["value"]["error"].as_str() {
        bail!("WebDriver {method} {path}: {e}: {}", v["value"]["message"]);
    }
    Ok(v["value"].clone())
}

impl Browser {
    pub fn start() -> Result<Browser> {
        let port = crate::free_port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = request(port, "GET", "/status", None) {
                if v["ready"] == json!(true) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::Builder::new().prefix("chromium-").tempdir()?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1360,1000",
                         "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let v = request(port, "POST", "/session", Some(&caps))?;
        b.session = v["sessionId"]
            .as_str()
            .context("no session id from chromedriver")?
            .to_string();
        Ok(b)
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        request(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            Some(&body.unwrap_or(json!({}))).filter(|_| method == "POST"),
        )
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({"url": url})))?;
        Ok(())
    }

    pub fn url(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub fn source(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/source", None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Elements matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Result<Vec<String>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits up to `timeout` for an element matching `css` whose text contains `needle`.
    pub fn wait_for(&self, css: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for e in self.find_all(css).unwrap_or_default() {
                if self.text(&e).map(|t| t.contains(needle)).unwrap_or(false) {
                    return Ok(e);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no {css} with {needle:?} within {timeout:?} at {}: {}",
                    self.url().unwrap_or_default(),
                    self.find_all("body")
                        .ok()
                        .and_then(|b| b.first().and_then(|b| self.text(b).ok()))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self
            .cmd("GET", &format!("/element/{element}/text"), None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub fn click(&self, element: &str) -> Result<()> {
        self.cmd("POST", &format!("/element/{element}/click"), None)?;
        Ok(())
    }

    /// The first element matching `css` inside `element`.
    pub fn find_in(&self, element: &str, css: &str) -> Result<String> {
        let v = self.cmd(
            "POST",
            &format!("/element/{element}/element"),
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v[ELEMENT].as_str().context("no element")?.to_string())
    }

    pub fn execute(&self, script: &str) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    pub fn cookies(&self) -> Result<Vec<Value>> {
        Ok(self
            .cmd("GET", "/cookie", None)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// A PNG of the window.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
