//! `flowgrid http-worker`: a worker whose task `request` calls an HTTP service, so a flow
//! can use a service with an HTTP API without a worker of its own.
//!
//! The task's input says what to send (`url`, `method`, `headers`, `body`, `timeout_ms`);
//! its output is the response (`status`, `headers`, `body`, parsed when it is JSON). Only
//! URLs under the prefixes given with `--allow` are called, redirects included, so a flow
//! cannot make the worker reach anything else. A 2xx response is the task's output; 429, 5xx
//! and failures to connect are retryable errors (`http_503`, `unavailable`), any other
//! status a final one (`http_404`), so the step's `retry` and `catch` decide what follows.
//! `--max-rate` paces the requests of each pool for a service with a quota.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flowgrid_sdk::{BoxFuture, Task, TaskError, TaskHandler};
use reqwest::{header, Method, Url};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The one task name the worker serves.
pub const TASK: &str = "request";
/// Redirects one request follows at most (browsers stop near 20; an API needs one or two).
const REDIRECTS_MAX: usize = 5;
/// Characters of a failed response's body quoted in the attempt's error message: enough for
/// a service's error text, small enough for `run get` and the history.
const ERROR_BODY_CHARS: usize = 300;

/// What a `request` task's input may hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    url: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// A string is sent as it is (`text/plain` unless `headers` says otherwise); any other
    /// JSON value as JSON.
    #[serde(default)]
    body: Option<Value>,
    /// At most the worker's `--timeout-ms`.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn get() -> String {
    "GET".to_owned()
}

/// The worker's settings (the `http-worker` flags).
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// URL prefixes a request may go to, as parsed URLs (normalized).
    pub allowed: Vec<Url>,
    /// The longest a request may take, and the default.
    pub timeout: Duration,
    /// The largest response body taken, in bytes.
    pub body_bytes_max: usize,
    /// Certificate authorities (PEM) trusted besides the system's.
    pub extra_roots: Vec<reqwest::Certificate>,
}

/// Calls HTTP services for `request` tasks.
#[derive(Clone)]
pub struct HttpWorker {
    client: reqwest::Client,
    settings: Arc<HttpSettings>,
}

impl HttpWorker {
    pub fn new(settings: HttpSettings) -> anyhow::Result<HttpWorker> {
        // The process's TLS provider, once: ring, as for NATS (an error: one is set already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let settings = Arc::new(settings);
        let allowed = Arc::clone(&settings);
        // A redirect is followed only to an allowed URL.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= REDIRECTS_MAX {
                attempt.error(format!("more than {REDIRECTS_MAX} redirects"))
            } else if allowed.allows(attempt.url()) {
                attempt.follow()
            } else {
                let url = attempt.url().to_string();
                attempt.error(format!("redirected to {url}, which no --allow prefix covers"))
            }
        });
        let client = reqwest::Client::builder()
            .tls_certs_merge(settings.extra_roots.iter().cloned())
            .redirect(redirects)
            .user_agent(concat!("flowgrid-http-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpWorker { client, settings })
    }

    async fn call(&self, task: &Task) -> Result<Value, TaskError> {
        if task.name() != TASK {
            return Err(final_error(
                "unknown_task",
                format!("the HTTP worker serves the task {TASK:?}, not {:?}", task.name()),
            ));
        }
        let request: Request = serde_json::from_value(task.input().clone()).map_err(|error| {
            final_error(
                "invalid_input",
                format!("the input of a {TASK} task: {error} (url, method, headers, body, timeout_ms)"),
            )
        })?;
        let url = Url::parse(&request.url)
            .map_err(|error| final_error("invalid_input", format!("url {:?}: {error}", request.url)))?;
        if !self.settings.allows(&url) {
            return Err(final_error(
                "forbidden_url",
                format!("{url} is under no --allow prefix of this worker ({})", self.settings.allowed_list()),
            ));
        }
        let method = Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| final_error("invalid_input", format!("method {:?} is not an HTTP method", request.method)))?;
        // No longer than the attempt has left: past its deadline its result is not taken.
        let timeout = request
            .timeout_ms
            .map_or(self.settings.timeout, |ms| Duration::from_millis(ms).min(self.settings.timeout))
            .min(task.time_left());
        if let Some(name) = request.headers.keys().find(|name| is_connection_header(name)) {
            return Err(final_error(
                "invalid_input",
                format!(
                    "header {name:?} is the worker's to set, not a flow's: it says where the request goes or how it \
                     is framed (the URL under --allow decides where)"
                ),
            ));
        }
        let mut builder = self.client.request(method, url.clone()).timeout(timeout);
        let has = |name: &str| request.headers.keys().any(|key| key.eq_ignore_ascii_case(name));
        if !has("idempotency-key") {
            // The same for every delivery of this attempt, so the service can drop a repeat.
            builder = builder.header("Idempotency-Key", task.attempt().to_string());
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = match request.body {
            None | Some(Value::Null) => builder,
            Some(Value::String(text)) if has("content-type") => builder.body(text),
            Some(Value::String(text)) => builder.header(header::CONTENT_TYPE, "text/plain; charset=utf-8").body(text),
            Some(value) => builder.json(&value),
        };
        let response = builder.send().await.map_err(|error| unreachable_error(&url, &error))?;
        let status = response.status();
        // A header the service sent more than once (`set-cookie`, `link`) is a list of its
        // values, in order; one sent once, its value.
        let headers: Map<String, Value> = response
            .headers()
            .keys()
            .filter_map(|name| {
                let mut values: Vec<Value> = response
                    .headers()
                    .get_all(name)
                    .iter()
                    .filter_map(|value| Some(json!(value.to_str().ok()?)))
                    .collect();
                // A header none of whose values is text is left out.
                let value = match values.len() {
                    0 => return None,
                    1 => values.remove(0),
                    _ => Value::Array(values),
                };
                Some((name.as_str().to_owned(), value))
            })
            .collect();
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.contains("json"));
        let bytes = self.read_body(response, &url).await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else if is_json {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
        } else {
            json!(String::from_utf8_lossy(&bytes))
        };
        if status.is_success() {
            return Ok(json!({ "status": status.as_u16(), "headers": headers, "body": body }));
        }
        let excerpt: String = match &body {
            Value::String(text) => text.chars().take(ERROR_BODY_CHARS).collect(),
            other => other.to_string().chars().take(ERROR_BODY_CHARS).collect(),
        };
        Err(TaskError {
            code: format!("http_{}", status.as_u16()),
            message: format!("{url} answered {status}: {excerpt}"),
            retryable: status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
        })
    }

    /// The response body, refused past `--response-max-kb`.
    async fn read_body(&self, mut response: reqwest::Response, url: &Url) -> Result<Vec<u8>, TaskError> {
        let max = self.settings.body_bytes_max;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| unreachable_error(url, &error))? {
            if bytes.len() + chunk.len() > max {
                return Err(final_error(
                    "payload_too_large",
                    format!("the response of {url} is over {} KiB (--response-max-kb)", max / 1024),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

impl HttpSettings {
    /// True when `url` lies under an allowed prefix: the same scheme, host and port, and a
    /// path under the prefix's, whole segments only (`/ok` allows `/ok` and `/ok/x`, not
    /// `/okay`). A path with an encoded slash or backslash is under none: a service that
    /// decodes it would take `/ok%2F..%2Fadmin` for `/admin`.
    fn allows(&self, url: &Url) -> bool {
        let path = url.path();
        let lower = path.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return false;
        }
        self.allowed.iter().any(|prefix| {
            let under = prefix.path();
            prefix.scheme() == url.scheme()
                && prefix.host_str() == url.host_str()
                && prefix.port_or_known_default() == url.port_or_known_default()
                && path
                    .strip_prefix(under)
                    .is_some_and(|rest| under.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
        })
    }

    fn allowed_list(&self) -> String {
        self.allowed.iter().map(Url::as_str).collect::<Vec<_>>().join(", ")
    }
}

impl TaskHandler for HttpWorker {
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<Value, TaskError>> {
        let worker = self.clone();
        Box::pin(async move { worker.call(&task).await })
    }
}

/// The certificates of a PEM file of authorities (`--ca-file`).
pub fn read_authorities(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem =
        std::fs::read(path).map_err(|error| anyhow::anyhow!("cannot read --ca-file {}: {error}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|error| anyhow::anyhow!("--ca-file {} holds no PEM certificates: {error}", path.display()))?;
    if certificates.is_empty() {
        anyhow::bail!("--ca-file {} holds no PEM certificate", path.display());
    }
    Ok(certificates)
}

/// Parses an `--allow` prefix: an http or https URL.
pub fn parse_allowed(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{text:?} is not an http:// or https:// URL with a host"));
    }
    Ok(url)
}

fn final_error(code: &str, message: String) -> TaskError {
    TaskError { code: code.to_owned(), message, retryable: false }
}

fn unreachable_error(url: &Url, error: &reqwest::Error) -> TaskError {
    let what = if error.is_timeout() { "timed out" } else { "failed" };
    // A refused redirect or a request that cannot be built (a header name or value that
    // HTTP does not allow) is the flow's doing: trying again changes nothing.
    let (code, retryable) = if error.is_redirect() {
        ("forbidden_url", false)
    } else if error.is_builder() {
        ("invalid_input", false)
    } else {
        ("unavailable", true)
    };
    let mut message = format!("the request to {url} {what}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    TaskError { code: code.to_owned(), message, retryable }
}

/// Headers that choose where a request goes (`Host`: another site behind the same address
/// and port, past `--allow`) or how it is framed on the connection: never a flow's.
fn is_connection_header(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    let framing = "content-length transfer-encoding connection upgrade te trailer keep-alive expect";
    name == "host" || framing.split(' ').any(|header| header == name) || name.starts_with("proxy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefixes: &[&str]) -> HttpSettings {
        HttpSettings {
            allowed: prefixes.iter().map(|prefix| parse_allowed(prefix).unwrap()).collect(),
            timeout: Duration::from_secs(5),
            body_bytes_max: 1024,
            extra_roots: Vec::new(),
        }
    }

    #[test]
    fn headers_that_choose_where_or_how_a_request_goes_are_the_workers() {
        for name in ["Host", " host", "Content-Length", "Transfer-Encoding", "Proxy-Authorization", "connection"] {
            assert!(is_connection_header(name), "{name}");
        }
        for name in ["Authorization", "Content-Type", "Idempotency-Key", "X-Host"] {
            assert!(!is_connection_header(name), "{name}");
        }
    }

    #[test]
    fn a_url_is_allowed_only_under_a_prefix_with_its_scheme_host_and_port() {
        let allowed = settings(&["https://api.example.com/v1/", "http://127.0.0.1:8080/", "http://h:9/ok"]);
        for (url, expected) in [
            ("http://h:9/ok", true),
            ("http://h:9/ok/x?y=1", true),
            ("http://h:9/okay-admin", false),
            ("http://h:9/ok%2F..%2F..%2Fevil", false),
            ("http://h:9/ok/..%5Cevil", false),
            ("http://h:9/ok/../evil", false),
            ("https://api.example.com/v1/orders?id=3", true),
            ("https://api.example.com:443/v1/x", true),
            ("https://api.example.com/v2/orders", false),
            ("http://api.example.com/v1/orders", false),
            ("https://api.example.com.evil.net/v1/", false),
            ("http://127.0.0.1:8080/anything", true),
            ("http://127.0.0.1:8081/anything", false),
            ("http://localhost:8080/anything", false),
        ] {
            assert_eq!(allowed.allows(&Url::parse(url).unwrap()), expected, "{url}");
        }
    }

    #[test]
    fn only_http_urls_with_a_host_are_prefixes() {
        assert!(parse_allowed("https://api.example.com/").is_ok());
        for bad in ["ftp://example.com/", "file:///etc/", "example.com", "http://"] {
            assert!(parse_allowed(bad).is_err(), "{bad}");
        }
    }
}
