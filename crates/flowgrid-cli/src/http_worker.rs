//! `flowgrid http-worker`: a worker whose task `request` calls an HTTP service, so a flow
//! can use a service with an HTTP API without a worker of its own.
//!
//! The task's input says what to send (`url`, `method`, `headers`, `body`, `timeout_ms`);
//! its output is the response (`status`, `headers`, `body`, parsed when it is JSON; a body
//! that is not text fails the task). Only URLs under the prefixes given with `--allow` are
//! called, redirects included, so a flow cannot make the worker reach anything else; a
//! redirect is followed only within the origin called, so the flow's headers and body reach
//! no other service. A 2xx response is the task's output; 429, 5xx and failures before an
//! answer (to connect, a timeout) are retryable errors (`http_503`, `unavailable`), any other
//! status a final one (`http_404`), whatever the size of its body, so the step's `retry` and
//! `catch` decide what follows. A 2xx answer whose body breaks off fails with a final
//! `response_incomplete`: the service may have applied the request, and another attempt
//! would send it again under a new `Idempotency-Key`. `--max-rate` paces the requests of
//! each pool for a service with a quota.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use flowgrid_proto::Encoding;
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
/// Bytes of a failed response's body read at most: the quote needs no more (300 characters
/// of up to 4 bytes), and an error page past `--response-max-kb` keeps its status.
const ERROR_BODY_BYTES_MAX: usize = 4 * 1024;
/// The largest `--response-max-kb`: a task's output is at most 1 MiB (the grid's payload
/// limit), and the body must leave room in it for the status and headers.
pub const RESPONSE_MAX_KB_MAX: u64 = 960;
/// Room under the grid's payload limit for the fields of a task's result other than its
/// output (the attempt's id, ...).
const RESULT_ROOM_BYTES: usize = 4 * 1024;

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
    /// At most the worker's `--timeout-ms` (a longer one is cut to it); 0 is refused.
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

/// How long one request may take, and which limit made it so, for the message of a
/// request that timed out.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RequestTimeout {
    limit: Duration,
    set_by: TimeoutSource,
}

/// The limit that bounds a request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TimeoutSource {
    /// The task's `timeout_ms`.
    Task,
    /// The worker's `--timeout-ms`; what the task asked for past it, if it did.
    Worker { asked_ms: Option<u64> },
    /// What the attempt had left before its deadline (its step's `timeout_ms`): past it, its
    /// result is not taken.
    Attempt,
}

impl RequestTimeout {
    /// The task's `timeout_ms` (`asked_ms`), else the worker's `--timeout-ms` (`worker`),
    /// and never past the attempt's deadline (`left`). A `timeout_ms` of 0 is refused: every
    /// attempt would time out at once.
    fn new(asked_ms: Option<u64>, worker: Duration, left: Duration) -> Result<RequestTimeout, TaskError> {
        let (limit, set_by) = match asked_ms {
            Some(0) => {
                return Err(final_error(
                    "invalid_input",
                    format!(
                        "timeout_ms 0 leaves the request no time: give the longest it may take in milliseconds (at \
                         most the worker's --timeout-ms, {} ms), or leave timeout_ms out for that",
                        worker.as_millis()
                    ),
                ))
            }
            Some(ms) if Duration::from_millis(ms) <= worker => (Duration::from_millis(ms), TimeoutSource::Task),
            asked_ms => (worker, TimeoutSource::Worker { asked_ms }),
        };
        Ok(if left < limit {
            RequestTimeout { limit: left, set_by: TimeoutSource::Attempt }
        } else {
            RequestTimeout { limit, set_by }
        })
    }
}

/// `30000 ms (the worker's --timeout-ms; the task asked for 120000)`.
impl fmt::Display for RequestTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms (", self.limit.as_millis())?;
        match self.set_by {
            TimeoutSource::Task => write!(f, "the task's timeout_ms)"),
            TimeoutSource::Worker { asked_ms: None } => write!(f, "the worker's --timeout-ms)"),
            TimeoutSource::Worker { asked_ms: Some(asked) } => {
                write!(f, "the worker's --timeout-ms; the task asked for {asked})")
            }
            TimeoutSource::Attempt => write!(f, "what the attempt had left of its step's timeout_ms)"),
        }
    }
}

/// Calls HTTP services for `request` tasks.
#[derive(Clone)]
pub struct HttpWorker {
    client: reqwest::Client,
    settings: Arc<HttpSettings>,
    /// The largest output a result carries: the grid's payload limit less the result's
    /// other fields.
    output_bytes_max: usize,
    /// How deeply an output's arrays and objects may nest: the grid's bound on a value.
    output_depth_max: usize,
}

impl HttpWorker {
    pub fn new(settings: HttpSettings) -> anyhow::Result<HttpWorker> {
        let kib = settings.body_bytes_max >> 10;
        if kib > RESPONSE_MAX_KB_MAX as usize {
            anyhow::bail!(
                "--response-max-kb {kib} is over {RESPONSE_MAX_KB_MAX}: a task's output is at most 1 MiB, and the \
                 response's status and headers need room in it besides the body"
            );
        }
        // The process's TLS provider, once: ring, as for NATS (an error: one is set already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let settings = Arc::new(settings);
        let allowed = Arc::clone(&settings);
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            match allowed.refuse_redirect(attempt.url(), attempt.previous()) {
                Some(refusal) => attempt.error(refusal),
                None => attempt.follow(),
            }
        });
        let client = reqwest::Client::builder()
            .tls_certs_merge(settings.extra_roots.iter().cloned())
            .redirect(redirects)
            // A Referer would hand the URL called, its query's tokens too, to the next one.
            .referer(false)
            .user_agent(concat!("flowgrid-http-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let limits = flowgrid_model::Limits::default();
        let output_bytes_max = limits.payload_bytes_max - RESULT_ROOM_BYTES;
        Ok(HttpWorker { client, settings, output_bytes_max, output_depth_max: limits.nesting_depth_max })
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
        let timeout = RequestTimeout::new(request.timeout_ms, self.settings.timeout, task.time_left())?;
        if let Some((first, second)) = same_header_twice(&request.headers) {
            return Err(final_error(
                "invalid_input",
                format!(
                    "headers {first:?} and {second:?} are the same header (HTTP header names ignore case), and the \
                     request would carry both: give it once"
                ),
            ));
        }
        if let Some(name) = request.headers.keys().find(|name| is_connection_header(name)) {
            return Err(final_error(
                "invalid_input",
                format!(
                    "header {name:?} is the worker's to set, not a flow's: it says where the request goes or how it \
                     is framed (the URL under --allow decides where)"
                ),
            ));
        }
        let mut builder = self.client.request(method, url.clone()).timeout(timeout.limit);
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
        let response = builder.send().await.map_err(|error| unreachable_error(&url, &error, &timeout))?;
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).map(str::to_owned);
        if !status.is_success() {
            let start = read_start(response, ERROR_BODY_BYTES_MAX).await;
            return Err(status_error(&url, status, &start, content_type.as_deref()));
        }
        let headers = response_headers(response.headers());
        let bytes = self.read_body(response, &url, &timeout).await?;
        let body = parse_body(bytes, content_type.as_deref(), &url)?;
        let output = json!({ "status": status.as_u16(), "headers": headers, "body": body });
        self.check_output(&output, &url)?;
        Ok(output)
    }

    /// The response body, refused past `--response-max-kb`. A body that breaks off (a reset,
    /// a stall past the timeout) fails with [`incomplete_error`]: the service answered, so it
    /// may have applied the request.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        url: &Url,
        timeout: &RequestTimeout,
    ) -> Result<Vec<u8>, TaskError> {
        let max = self.settings.body_bytes_max;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|error| incomplete_error(url, status, bytes.len(), &error, timeout))?
        {
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

    /// Refuses an output the grid would not take, naming the URL: one nested deeper than a
    /// value may be (`invalid_output`, the code the grid gives it, whose message names
    /// neither; nested past what the grid decodes, the result would be dropped unrecorded,
    /// and the attempt's timeout would send the request again), or over what a task's
    /// result may carry (`payload_too_large`, the code the worker sends in its place). The
    /// body is under `--response-max-kb`, but many headers, or a JSON body of numbers (an
    /// encoded number takes 9 bytes, `0.5,` 4), can still make too large an output.
    fn check_output(&self, output: &Value, url: &Url) -> Result<(), TaskError> {
        let depth = flowgrid_model::limits::nesting_depth(output);
        if depth > self.output_depth_max {
            return Err(final_error(
                "invalid_output",
                format!(
                    "the response of {url} makes an output nested {depth} levels deep (the body under status and \
                     headers), over the {} levels a task's output may nest: ask the service for a flatter answer",
                    self.output_depth_max
                ),
            ));
        }
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, output).map_or(usize::MAX, |encoded| encoded.len());
        if bytes <= self.output_bytes_max {
            return Ok(());
        }
        Err(final_error(
            "payload_too_large",
            format!(
                "the response of {url} makes an output of {bytes} bytes (status, headers and body, as the result \
                 carries them), over the {} bytes a task's result may carry: ask the service for less (a page, fewer \
                 fields); --response-max-kb bounds the body as received",
                self.output_bytes_max
            ),
        ))
    }
}

/// The response's headers for the output. One the service sent more than once
/// (`set-cookie`, `link`) is a list of its values, in order; one sent once, its value.
fn response_headers(headers: &header::HeaderMap) -> Map<String, Value> {
    headers
        .keys()
        .filter_map(|name| {
            let mut values: Vec<Value> =
                headers.get_all(name).iter().filter_map(|value| Some(json!(value.to_str().ok()?))).collect();
            // A header none of whose values is text is left out.
            let value = match values.len() {
                0 => return None,
                1 => values.remove(0),
                _ => Value::Array(values),
            };
            Some((name.as_str().to_owned(), value))
        })
        .collect()
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|value| value.contains("json"))
}

/// A 2xx response's body as the output holds it: JSON parsed, other text as it is. A body
/// that is not UTF-8 (an image, a PDF) fails the task: an output is JSON, which has no room
/// for its bytes, and replacing them (U+FFFD, 3 bytes each) would corrupt it silently.
fn parse_body(bytes: Vec<u8>, content_type: Option<&str>, url: &Url) -> Result<Value, TaskError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        let kind = content_type.map_or_else(|| "no Content-Type".to_owned(), |value| format!("Content-Type {value}"));
        final_error(
            "binary_response",
            format!(
                "{url} answered with a body that is not UTF-8 text ({kind}): the HTTP worker passes on text and \
                 JSON bodies only; have the service send the data as base64 in JSON, or a URL to fetch it from"
            ),
        )
    })?;
    if is_json(content_type) {
        if let Ok(value) = serde_json::from_str(&text) {
            return Ok(value);
        }
    }
    Ok(Value::String(text))
}

/// The first `max` bytes of a response's body, fewer when it ends or breaks off sooner. A
/// failed response's body is read for its quote only: an error page past
/// `--response-max-kb` keeps its status (and its retry), and a failure reading it changes
/// nothing.
async fn read_start(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(max);
    bytes
}

/// The error of a response that is not 2xx: `http_<status>`, retryable for 429 and 5xx,
/// with the start of its body (a JSON body on one line, when it is whole).
fn status_error(url: &Url, status: reqwest::StatusCode, start: &[u8], content_type: Option<&str>) -> TaskError {
    let parsed = is_json(content_type).then(|| serde_json::from_slice::<Value>(start).ok()).flatten();
    let text = match parsed {
        Some(Value::String(text)) => text,
        Some(value) => value.to_string(),
        None => String::from_utf8_lossy(start).into_owned(),
    };
    let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
    let message = match excerpt.trim() {
        "" => format!("{url} answered {status}"),
        excerpt => format!("{url} answered {status}: {excerpt}"),
    };
    TaskError {
        code: format!("http_{}", status.as_u16()),
        message,
        retryable: status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
    }
}

/// Why the worker does not follow a redirect; the redirect policy's error, found again in
/// [`unreachable_error`] for its code.
#[derive(Debug)]
enum RedirectRefused {
    /// To a URL no `--allow` prefix covers.
    Outside(Url),
    /// Past [`REDIRECTS_MAX`]: a loop ends here too.
    TooMany,
    /// To another origin (scheme, host or port), though allowed: the flow's headers (an API
    /// key) and body are for the service it named, and reqwest would pass them on.
    OtherOrigin(Url),
}

impl RedirectRefused {
    fn code(&self) -> &'static str {
        match self {
            RedirectRefused::Outside(_) => "forbidden_url",
            RedirectRefused::TooMany => "too_many_redirects",
            RedirectRefused::OtherOrigin(_) => "cross_origin_redirect",
        }
    }
}

impl fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectRefused::Outside(url) => {
                write!(f, "redirected to {}, which no --allow prefix of this worker covers", without_query(url))
            }
            RedirectRefused::TooMany => write!(
                f,
                "more than {REDIRECTS_MAX} redirects (a loop, or a longer chain than the worker follows): call the URL \
                 they lead to"
            ),
            RedirectRefused::OtherOrigin(url) => write!(
                f,
                "redirected to another origin, {}: the worker follows redirects within the scheme, host and port \
                 called only, so that the flow's headers and body reach no other service; call that URL directly",
                without_query(url)
            ),
        }
    }
}

impl std::error::Error for RedirectRefused {}

/// `url` without its query, fragment and password, for a message: a redirect's target may
/// carry a token.
fn without_query(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    shown.to_string()
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

    /// Why a redirect to `next` is not followed, if it is not; `previous` are the URLs
    /// requested so far, the first one (not a redirect) included.
    fn refuse_redirect(&self, next: &Url, previous: &[Url]) -> Option<RedirectRefused> {
        if !self.allows(next) {
            Some(RedirectRefused::Outside(next.clone()))
        } else if previous.len() > REDIRECTS_MAX {
            Some(RedirectRefused::TooMany)
        } else if previous.last().is_some_and(|from| from.origin() != next.origin()) {
            Some(RedirectRefused::OtherOrigin(next.clone()))
        } else {
            None
        }
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

/// Parses an `--allow` prefix: an http or https URL without a query, fragment or user.
/// A prefix is matched on scheme, host, port and path only ([`HttpSettings::allows`]): a
/// query would be dropped without a word, and `?tenant=7` would allow `?tenant=8`.
pub fn parse_allowed(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{text:?} is not an http:// or https:// URL with a host"));
    }
    let extra = if url.query().is_some() {
        Some("a query (`?...`)")
    } else if url.fragment().is_some() {
        Some("a fragment (`#...`)")
    } else if !url.username().is_empty() || url.password().is_some() {
        Some("a user (`user@`)")
    } else {
        None
    };
    let Some(extra) = extra else { return Ok(url) };
    // The message goes to the terminal and the logs: not the password.
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    Err(format!(
        "\"{shown}\" has {extra}: a prefix is matched on scheme, host, port and path only, so give those alone (a \
         flow's own URL carries its query; credentials go in the task's headers)"
    ))
}

fn final_error(code: &str, message: String) -> TaskError {
    TaskError { code: code.to_owned(), message, retryable: false }
}

/// The error of a request that got no answer. A timeout names the limit that applied
/// (`timeout`); the service may still have applied the request, as after any failure past
/// the connect.
fn unreachable_error(url: &Url, error: &reqwest::Error, timeout: &RequestTimeout) -> TaskError {
    // A refused redirect: the same again next time.
    if let Some(refusal) = redirect_refusal(error) {
        return final_error(refusal.code(), format!("{url}: {refusal}"));
    }
    let what = if error.is_timeout() { format!("timed out after {timeout}") } else { "failed".to_owned() };
    // A redirect reqwest refused, or a request that cannot be built (a header name or value
    // that HTTP does not allow), is the flow's doing: trying again changes nothing.
    let (code, retryable) = if error.is_redirect() {
        ("forbidden_url", false)
    } else if error.is_builder() {
        ("invalid_input", false)
    } else {
        ("unavailable", true)
    };
    let message = format!("the request to {url} {what}: {}", with_causes(error));
    TaskError { code: code.to_owned(), message, retryable }
}

/// The error of a 2xx answer (`status`) whose body broke off after `read` bytes: final, as
/// the service may have applied the request, and another attempt would send it again under
/// a new `Idempotency-Key`.
fn incomplete_error(
    url: &Url,
    status: reqwest::StatusCode,
    read: usize,
    error: &reqwest::Error,
    timeout: &RequestTimeout,
) -> TaskError {
    let why = if error.is_timeout() { format!("the read timed out after {timeout}") } else { with_causes(error) };
    final_error(
        "response_incomplete",
        format!(
            "{url} answered {status} but its body broke off after {read} bytes: the request may have been applied, \
             so it is not sent again; {why}"
        ),
    )
}

/// `error` and its causes, joined by `: `.
fn with_causes(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// The worker's own reason for not following a redirect, among the causes of `error`.
fn redirect_refusal(error: &reqwest::Error) -> Option<&RedirectRefused> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<RedirectRefused>() {
            return Some(refusal);
        }
        source = cause.source();
    }
    None
}

/// Two header names of `headers` that differ in case only, if any: HTTP takes them for one
/// header, and the request would carry it twice.
fn same_header_twice(headers: &BTreeMap<String, String>) -> Option<(&str, &str)> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for name in headers.keys() {
        if let Some(first) = seen.insert(name.to_ascii_lowercase(), name) {
            return Some((first, name));
        }
    }
    None
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
    fn a_redirect_is_followed_five_times_within_its_origin_and_allowed_prefixes() {
        let allowed = settings(&["http://h:9/ok/", "http://other:9/ok/"]);
        let url = |text: &str| Url::parse(text).unwrap();
        let refusal = |next: &str, previous: usize| {
            let chain: Vec<Url> = (0..previous).map(|hop| url(&format!("http://h:9/ok/{hop}"))).collect();
            allowed.refuse_redirect(&url(next), &chain).map(|refusal| refusal.code())
        };
        // `previous` holds the first request: 5 of them, 4 redirects followed, the 5th asked.
        assert_eq!(refusal("http://h:9/ok/next", 5), None);
        assert_eq!(refusal("http://h:9/ok/next", 6), Some("too_many_redirects"));
        assert_eq!(refusal("http://h:9/admin", 1), Some("forbidden_url"));
        assert_eq!(refusal("http://other:9/ok/next", 1), Some("cross_origin_redirect"));
        assert_eq!(refusal("http://h:80/ok/next", 1), Some("forbidden_url"));
    }

    #[test]
    fn a_body_that_is_not_text_fails_and_json_is_parsed() {
        let url = Url::parse("http://h:9/ok").unwrap();
        let png = vec![0x89, b'P', b'N', b'G', 0xff];
        let error = parse_body(png, Some("image/png"), &url).unwrap_err();
        assert!(
            error.code == "binary_response" && !error.retryable && error.message.contains("image/png"),
            "{error:?}"
        );
        assert_eq!(parse_body(b"{\"a\":1}".to_vec(), Some("application/json"), &url).unwrap(), json!({"a": 1}));
        assert_eq!(parse_body(b"{\"a\":".to_vec(), Some("application/json"), &url).unwrap(), json!("{\"a\":"));
        assert_eq!(parse_body(b"caf\xc3\xa9".to_vec(), None, &url).unwrap(), json!("café"));
        assert_eq!(parse_body(Vec::new(), None, &url).unwrap(), Value::Null);
    }

    #[test]
    fn a_status_error_quotes_the_start_of_the_body() {
        let url = Url::parse("http://h:9/ok").unwrap();
        let error =
            status_error(&url, reqwest::StatusCode::BAD_GATEWAY, b"{ \"error\": \"down\" }", Some("application/json"));
        assert_eq!((error.code.as_str(), error.retryable), ("http_502", true));
        assert!(error.message.ends_with(r#"502 Bad Gateway: {"error":"down"}"#), "{error:?}");
        let error = status_error(&url, reqwest::StatusCode::NOT_FOUND, &[b'x'; 4096], Some("text/html"));
        assert_eq!((error.code.as_str(), error.retryable), ("http_404", false));
        assert!(error.message.ends_with(&"x".repeat(ERROR_BODY_CHARS)) && error.message.len() < 400, "{error:?}");
        let error = status_error(&url, reqwest::StatusCode::TOO_MANY_REQUESTS, b"", None);
        assert_eq!((error.message.as_str(), error.retryable), ("http://h:9/ok answered 429 Too Many Requests", true));
    }

    /// A `request` task of `input` for attempt 1, with no deadline of its own.
    fn request_task(input: Value) -> Task {
        let attempt = flowgrid_model::AttemptId {
            run_id: flowgrid_model::RunId("run".into()),
            step: "call".into(),
            item: None,
            attempt: 1,
        };
        Task::new(attempt, "http", TASK, input, u64::MAX)
    }

    #[tokio::test]
    async fn a_timeout_of_0_is_refused_and_a_timeout_names_the_limit_that_applied() {
        // A service that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!("http://127.0.0.1:{}/slow", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        let worker =
            HttpWorker::new(HttpSettings { timeout: Duration::from_millis(200), ..settings(&[url.as_str()]) }).unwrap();
        let call = |input: Value| {
            let worker = worker.clone();
            async move { worker.call(&request_task(input)).await }
        };

        // Before, every attempt timed out at once, as a retryable `unavailable`.
        let error = call(json!({"url": url, "timeout_ms": 0})).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("invalid_input", false), "{error:?}");
        assert!(error.message.contains("timeout_ms"), "{error:?}");

        // Before, cut to --timeout-ms without a word.
        let error = call(json!({"url": url, "timeout_ms": 120_000})).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("unavailable", true), "{error:?}");
        let cut = "timed out after 200 ms (the worker's --timeout-ms; the task asked for 120000)";
        assert!(error.message.contains(cut), "{error:?}");
        let error = call(json!({"url": url, "timeout_ms": 50})).await.unwrap_err();
        assert!(error.message.contains("timed out after 50 ms (the task's timeout_ms)"), "{error:?}");
        // Nor past the attempt's deadline.
        let (worker, left) = (Duration::from_secs(30), Duration::from_secs(1));
        let timeout = RequestTimeout::new(Some(5_000), worker, left).unwrap();
        assert_eq!(timeout.to_string(), "1000 ms (what the attempt had left of its step's timeout_ms)");
        let timeout = RequestTimeout::new(None, worker, Duration::MAX).unwrap();
        assert_eq!(timeout.to_string(), "30000 ms (the worker's --timeout-ms)");
    }

    #[test]
    fn only_http_urls_with_a_host_are_prefixes() {
        assert!(parse_allowed("https://api.example.com/").is_ok());
        for bad in ["ftp://example.com/", "file:///etc/", "example.com", "http://"] {
            assert!(parse_allowed(bad).is_err(), "{bad}");
        }
        // Matched on scheme, host, port and path only: `?tenant=7` would allow `?tenant=8`.
        for (bad, part) in [
            ("https://api/v1/orders?tenant=7", "a query"),
            ("https://api/v1/orders?", "a query"),
            ("https://api/v1/orders#top", "a fragment"),
            ("https://user:secret@api/v1/", "a user"),
            ("https://user@api/v1/", "a user"),
        ] {
            let error = parse_allowed(bad).unwrap_err();
            assert!(error.contains(part) && error.contains("scheme, host, port and path"), "{bad}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    /// A service on a local port that answers every request with 200 and the JSON `body`;
    /// its URL, and a count of the connections it took.
    async fn json_service(body: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!("http://127.0.0.1:{}/v1/answer", listener.local_addr().unwrap().port());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let response = Arc::new(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ));
        tokio::spawn(async move {
            while let Ok((mut connection, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let response = Arc::clone(&response);
                tokio::spawn(async move {
                    // The request's head (the requests here have no body), then the answer.
                    let (mut head, mut buffer) = (Vec::new(), [0; 4096]);
                    while !head.windows(4).any(|end| end == b"\r\n\r\n") {
                        match connection.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => head.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let _ = connection.write_all(response.as_bytes()).await;
                });
            }
        });
        (url, connections)
    }

    /// `depth` arrays, one in the other.
    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[tokio::test]
    async fn an_output_nested_deeper_than_the_grid_takes_fails_naming_the_url() {
        let depth_max = flowgrid_model::Limits::default().nesting_depth_max;
        // The body one level under the output: the deepest the grid takes, then one more,
        // then as deep as the grid's decoder still reads the body but not the result.
        for (body_depth, taken) in [(depth_max - 1, true), (depth_max, false), (126, false)] {
            let (url, _) = json_service(nested(body_depth)).await;
            let worker = HttpWorker::new(settings(&[url.as_str()])).unwrap();
            let result = worker.call(&request_task(json!({"url": url}))).await;
            if taken {
                let output = result.unwrap_or_else(|error| panic!("{body_depth} levels: {error:?}"));
                assert_eq!(flowgrid_model::limits::nesting_depth(&output), depth_max);
                continue;
            }
            let error = result.expect_err("too deep an output");
            assert_eq!((error.code.as_str(), error.retryable), ("invalid_output", false), "{error:?}");
            let levels = format!("nested {} levels deep", body_depth + 1);
            assert!(error.message.contains(&url) && error.message.contains(&levels), "{error:?}");
        }
    }

    #[tokio::test]
    async fn header_names_that_differ_in_case_only_are_refused_before_anything_is_sent() {
        let (url, connections) = json_service("{}".to_owned()).await;
        let worker = HttpWorker::new(settings(&[url.as_str()])).unwrap();
        let input = json!({"url": url, "headers": {"Authorization": "a", "authorization": "b"}});
        let error = worker.call(&request_task(input)).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("invalid_input", false), "{error:?}");
        assert!(error.message.contains(r#""Authorization" and "authorization""#), "{error:?}");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0, "the service was called");
        // The service answers a request with the header once.
        let input = json!({"url": url, "headers": {"Authorization": "a"}});
        assert_eq!(worker.call(&request_task(input)).await.unwrap()["body"], json!({}));
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
