//! The CLI's REST client: where to connect (flags, environment, profile
//! file), and requests whose failures say what to do.

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to reach a node; each falls back to an environment variable, then
/// to the profile file written by `braid init`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Base URL of the node's REST API, e.g. https://127.0.0.1:8888.
    #[arg(long, global = true, env = "BRAID_URL")]
    pub url: Option<String>,
    /// CA certificate (PEM) to trust for the node, e.g. DATA_DIR/tls/ca.pem.
    #[arg(long, global = true, env = "BRAID_CA")]
    pub ca: Option<PathBuf>,
    /// User to log in as. The password comes from $BRAID_PASSWORD (or the
    /// variable named by `braid init --password-env`).
    #[arg(long, global = true, env = "BRAID_USER")]
    pub user: Option<String>,
    /// Profile file [default: $XDG_CONFIG_HOME/braid/config.toml, else
    /// ~/.config/braid/config.toml].
    #[arg(long, global = true, env = "BRAID_CONFIG")]
    pub config: Option<PathBuf>,
    /// Items asked for per request by the list commands (1 to 1000); they
    /// show every item whatever it is, following the pages.
    #[arg(long, global = true, env = "BRAID_PAGE_SIZE", default_value_t = 1000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub page_size: usize,
}

/// The profile file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Profile {
    /// Base URL of the REST API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// CA certificate to trust.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// User name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The environment variable holding the password (never the password
    /// itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

impl ConnArgs {
    /// The profile file's path.
    pub fn config_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.config {
            return Ok(p.clone());
        }
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("braid/config.toml"));
        }
        let home = std::env::var_os("HOME")
            .context("no HOME: pass --config or set BRAID_CONFIG to place the profile file")?;
        Ok(PathBuf::from(home).join(".config/braid/config.toml"))
    }

    fn profile(&self) -> anyhow::Result<Profile> {
        let path = self.config_path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!(
                    "{} is not a valid braid profile; rewrite it with braid init",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Profile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// `braid init`: writes the profile file from the flags; returns its
    /// path.
    pub fn init(&self, password_env: Option<String>) -> anyhow::Result<PathBuf> {
        let url = self
            .url
            .clone()
            .context("braid init needs --url (e.g. --url https://127.0.0.1:8888)")?;
        let url = url.trim_end_matches('/').to_string();
        let user = self
            .user
            .clone()
            .context("braid init needs --user (e.g. --user admin)")?;
        let ca = match &self.ca {
            Some(ca) => {
                let abs = std::path::absolute(ca)
                    .with_context(|| format!("resolving {}", ca.display()))?;
                read_ca(&abs)?;
                Some(abs)
            }
            None => None,
        };
        let profile = Profile {
            url: Some(url),
            ca,
            user: Some(user),
            password_env,
        };
        let path = self.config_path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = format!(
            "# braid CLI profile, written by `braid init`. Flags and BRAID_URL, BRAID_CA,\n\
             # BRAID_USER override these; the password is read from the environment.\n{}",
            toml::to_string(&profile)?
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// A client from flags, environment and profile.
    pub fn client(&self) -> anyhow::Result<Client> {
        let profile = self.profile()?;
        let url = self
            .url
            .clone()
            .or(profile.url)
            .context("no node URL: pass --url, set BRAID_URL, or run braid init --url URL")?
            .trim_end_matches('/')
            .to_string();
        let user = self
            .user
            .clone()
            .or(profile.user)
            .context("no user: pass --user, set BRAID_USER, or run braid init --user NAME")?;
        let ca = self.ca.clone().or(profile.ca);
        let password_var = profile
            .password_env
            .unwrap_or_else(|| "BRAID_PASSWORD".to_string());
        let password = std::env::var("BRAID_PASSWORD")
            .ok()
            .or_else(|| std::env::var(&password_var).ok())
            .with_context(|| format!("no password for {user}: set {password_var}"))?;
        let mut c = Client::new(url, ca.as_deref(), user, password)?;
        c.page_size = self.page_size;
        Ok(c)
    }
}

fn read_ca(path: &Path) -> anyhow::Result<reqwest::Certificate> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the CA certificate {}: pass --ca DATA_DIR/tls/ca.pem of the node",
            path.display()
        )
    })?;
    reqwest::Certificate::from_pem(&pem)
        .with_context(|| format!("{} is not a PEM certificate", path.display()))
}

/// An async reqwest client that trusts exactly the CA in `ca_pem` (for
/// the demo and the benchmark, which talk to a node they started).
pub fn async_client(ca_pem: &Path) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(read_ca(ca_pem)?)
        .build()?)
}

/// A blocking REST client for one node and user.
pub struct Client {
    url: String,
    user: String,
    password: String,
    http: reqwest::blocking::Client,
    page_size: usize,
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// Its `id` (to resume after it with `Last-Event-ID`).
    pub id: Option<String>,
    /// Its `event` name.
    pub event: String,
    /// Its `data`.
    pub data: String,
}

/// The events of an event stream, read as they come.
pub struct EventStream<R = std::io::BufReader<reqwest::blocking::Response>> {
    lines: std::io::Lines<R>,
}

impl<R: std::io::BufRead> Iterator for EventStream<R> {
    type Item = std::io::Result<SseEvent>;

    /// The next event; `None` once the server ended the stream.
    fn next(&mut self) -> Option<Self::Item> {
        let (mut id, mut event, mut data) = (None, String::new(), Vec::<String>::new());
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Some(Ok(SseEvent {
                    id,
                    event: if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    },
                    data: data.join("\n"),
                }));
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match name {
                "id" => id = Some(value.to_string()),
                "event" => event = value.to_string(),
                "data" => data.push(value.to_string()),
                // Comments (keep-alives) and fields we do not use.
                _ => {}
            }
        }
    }
}

impl Client {
    /// A client for `url` as `user`, trusting `ca` (only it: there are no
    /// built-in roots, a node's certificate is its own CA's).
    pub fn new(
        url: String,
        ca: Option<&Path>,
        user: String,
        password: String,
    ) -> anyhow::Result<Client> {
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(10))
            .tls_built_in_root_certs(false);
        if let Some(ca) = ca {
            builder = builder.add_root_certificate(read_ca(ca)?);
        }
        Ok(Client {
            url,
            user,
            password,
            http: builder.build()?,
            page_size: 1000,
        })
    }

    /// Every item of a paginated list: `GET path` page after page,
    /// following `nextCursor`, as `{items: [...]}`.
    pub fn get_all(&self, path: &str, items: &str) -> anyhow::Result<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let mut page_path = format!("{path}{sep}limit={}", self.page_size);
            if let Some(c) = &cursor {
                page_path.push_str("&cursor=");
                page_path.push_str(&query_escape(c));
            }
            let mut page = self.get(&page_path)?;
            let Some(list) = page.get_mut(items).and_then(Value::as_array_mut) else {
                bail!("GET {page_path}: the node's answer has no {items:?} list: {page}");
            };
            all.append(list);
            match page.get("nextCursor") {
                Some(Value::String(next)) => {
                    if cursor.as_deref() == Some(next.as_str()) {
                        bail!("GET {page_path}: the node handed out the same page twice");
                    }
                    cursor = Some(next.clone());
                }
                _ => break,
            }
        }
        let mut out = serde_json::Map::new();
        out.insert(items.to_string(), Value::Array(all));
        Ok(Value::Object(out))
    }

    /// Opens the event stream at `path`, resuming after `last_event_id`
    /// when given; gives up on it (a read fails) after `timeout`.
    pub fn events(
        &self,
        path: &str,
        last_event_id: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<EventStream> {
        let mut req = self
            .http
            .get(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(timeout);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req
            .send()
            .map_err(|e| anyhow::anyhow!(self.transport_error(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            return Err(self.refused(&format!("GET {path}"), status, &text));
        }
        use std::io::BufRead as _;
        Ok(EventStream {
            lines: std::io::BufReader::new(resp).lines(),
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, |r| r)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, |r| r.json(body))
    }

    /// `PUT path` with a JSON body (or none for `Value::Null`).
    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::PUT, path, |r| {
            if body.is_null() { r } else { r.json(body) }
        })
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::DELETE, path, |r| r)
    }

    /// `POST path` with raw bytes.
    pub fn post_bytes(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, |r| {
            r.header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
        })
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl FnOnce(reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<Value> {
        let what = format!("{method} {path}");
        let req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password));
        let resp = build(req)
            .send()
            .map_err(|e| anyhow::anyhow!(self.transport_error(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .map_err(|e| anyhow::anyhow!(self.transport_error(&e)))?;
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)));
        }
        Err(self.refused(&what, status, &text))
    }

    /// The error for a request the node refused, saying what to do.
    fn refused(&self, what: &str, status: reqwest::StatusCode, text: &str) -> anyhow::Error {
        let body: Value =
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()));
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| text.trim().to_string());
        let code = body.get("code").and_then(Value::as_str).unwrap_or("");
        let (user, url) = (&self.user, &self.url);
        match status.as_u16() {
            401 => anyhow::anyhow!(
                "wrong user or password for {user} at {url}; check BRAID_USER/BRAID_PASSWORD \
                 or braid init"
            ),
            403 => anyhow::anyhow!(
                "{user} is not permitted to {what} at {url}: {message}; ask a user admin for a \
                 role that allows it"
            ),
            429 => anyhow::anyhow!(
                "too many failed logins for {user} at {url}: {message}; wait and retry with \
                 the right password"
            ),
            s => anyhow::anyhow!("{what} failed (HTTP {s} {code}): {message}"),
        }
    }

    /// Names what went wrong below HTTP, and what to do about it.
    fn transport_error(&self, e: &reqwest::Error) -> String {
        let url = &self.url;
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut detail = e.to_string();
        while let Some(err) = source {
            let tls = find_rustls_error(err);
            if let Some(tls) = tls {
                return match tls {
                    rustls::Error::InvalidCertificate(why) => format!(
                        "the node's certificate is not trusted ({why:?}): pass --ca \
                         DATA_DIR/tls/ca.pem (the node's CA; or set BRAID_CA, or braid init --ca)"
                    ),
                    other => format!("TLS with {url} failed: {other}"),
                };
            }
            detail = err.to_string();
            source = err.source();
        }
        if e.is_timeout() {
            format!("{url} did not answer in time: is the node overloaded? ({detail})")
        } else if e.is_connect() {
            format!("cannot reach {url}: is the node running? ({detail})")
        } else {
            format!("request to {url} failed: {detail}")
        }
    }
}

/// `s` escaped for a query string value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The rustls error in `err`, looking inside `io::Error`s (whose `source()`
/// skips the error they wrap, and which the connector nests).
fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    find_rustls_error(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;

    #[test]
    fn event_streams_are_parsed_as_sse() {
        let text = ": keep-alive\n\nevent: status\nid: 1f-7\ndata: {\"a\":\ndata: 1}\n\n\
                    id:2\r\ndata:x\r\n\r\nevent: resync\nid: 1f-9\ndata: {}\n\n: bye\n";
        let events: Vec<SseEvent> = EventStream {
            lines: std::io::Cursor::new(text).lines(),
        }
        .collect::<Result<_, _>>()
        .unwrap();
        assert_eq!(
            events,
            [
                SseEvent {
                    id: Some("1f-7".into()),
                    event: "status".into(),
                    data: "{\"a\":\n1}".into(),
                },
                SseEvent {
                    id: Some("2".into()),
                    event: "message".into(),
                    data: "x".into(),
                },
                SseEvent {
                    id: Some("1f-9".into()),
                    event: "resync".into(),
                    data: "{}".into(),
                },
            ]
        );
    }

    #[test]
    fn cursors_are_escaped_for_the_query() {
        assert_eq!(query_escape("AbC-_9"), "AbC-_9");
        assert_eq!(query_escape("a+b/c=&"), "a%2Bb%2Fc%3D%26");
    }
}
