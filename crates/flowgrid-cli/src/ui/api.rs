//! The HTTP API served beside the web UI, for services and browsers that speak HTTP rather
//! than NATS: read runs, their histories and the flows, follow a run's live output as
//! server-sent events, and, with `--api-token`, start, signal, pause, resume, cancel and
//! redrive runs.
//!
//! | Method and path | Body | Answer |
//! |---|---|---|
//! | `GET /api/runs/{id}` | | the run (`RunView`) |
//! | `GET /api/runs/{id}/history` | `?after=&limit=` | a page of its history (`RunHistory`) |
//! | `GET /api/runs/{id}/live` | | `text/event-stream`: an event `piece` per piece of live output, then `end` with the run's status |
//! | `GET /api/runs` | `?flow=&status=&label=k=v&parent=&since_ms=&until_ms=&limit=&cursor=` | a page of runs (`RunList`) |
//! | `GET /api/flows` | `?limit=&cursor=` | a page of the flows in name order (`FlowList`; `next_cursor` when more follow) |
//! | `GET /api/flows/{name}` | `?version=` | one flow (`FlowInfo`) |
//! | `POST /api/runs` | a `StartRun` | `201` (`200` when the idempotency key named a run that exists) and `RunStarted` |
//! | `POST /api/runs/{id}/signals/{step}` | the signal's data (header `Idempotency-Key`: the signal's id) | `RunSignalled` |
//! | `POST /api/runs/{id}/cancel`, `.../pause`, `.../resume` | `{"reason": "..."}` or nothing | `RunCancelled`, `RunPaused` |
//! | `POST /api/runs/{id}/redrive` | `{"reason": "...", "from": ["step"]}` or nothing | `RunRedriven` |
//!
//! Every answer is JSON; a refusal is `{"error": {"code", "message"}}` with the status its
//! code calls for; a refusal of the grid, every `503 unavailable` and every `429 overloaded`
//! also says whether to send the request again (`retryable`). Changes need `Authorization: Bearer <token>` with the token the UI was
//! started with; without one the API is read-only. With `--api-cors-origin`, pages of
//! those origins may call it from a browser (CORS: `GET` and `POST`, with
//! `Authorization` and `Content-Type`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Query, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use flowgrid_model::RunId;
use flowgrid_proto::{ListFlows, ListRuns, StartRun};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::Ui;
use crate::commands::{follow_live_output, piece_json};

/// How long one `live` request follows a run before it ends the stream (the client may
/// ask again: it gets the pieces from the start).
const LIVE_FOLLOW_MAX: Duration = Duration::from_secs(60 * 60);
/// Live streams open at once over all readers; past it, `429 overloaded`.
pub(super) const LIVE_STREAMS_MAX: usize = 256;
/// Events a slow reader may be behind before the following waits for it.
const LIVE_EVENTS_BUFFERED: usize = 256;
/// How long a live stream waits for its reader to take an event (the buffer full) before it
/// ends: a client that stopped reading without closing its connection holds no slot for long.
const LIVE_READER_WAIT: Duration = Duration::from_secs(60);
/// The shortest token `--api-token` takes.
pub(crate) const TOKEN_CHARS_MIN: usize = 16;

/// The header naming a signal sent again after a lost answer: the signal's id.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How long a browser may keep the answer to a CORS preflight.
const CORS_MAX_AGE: Duration = Duration::from_secs(60 * 60);

/// The API's routes, answering pages of the `cors` origins if there are any (the UI's own
/// pages need none: they are of the same origin).
pub(super) fn routes(ui: Arc<Ui>, cors: Option<CorsLayer>) -> Router<Arc<Ui>> {
    // Every answer under /api/ is JSON, a wrong method or path too.
    // Calls that take no query refuse one, as the others refuse parameters they do not take.
    let unqueried = Router::new()
        .route("/api/runs/{run_id}", get(run).fallback(method_not_allowed))
        .route("/api/runs/{run_id}/live", get(live).fallback(method_not_allowed))
        .route("/api/runs/{run_id}/signals/{step}", post(signal).fallback(method_not_allowed))
        .route("/api/runs/{run_id}/{change}", post(change).fallback(change_other_method))
        .route_layer(axum::middleware::from_fn(refuse_query));
    let api = Router::new()
        .route("/api/runs", post(start).get(list).fallback(method_not_allowed))
        .route("/api/runs/{run_id}/history", get(history).fallback(method_not_allowed))
        .route("/api/flows", get(flows).fallback(method_not_allowed))
        .route("/api/flows/{name}", get(flow).fallback(method_not_allowed))
        .merge(unqueried)
        // Before the calls that are none: a POST to a path that is no call is a 404.
        .route_layer(axum::middleware::from_fn_with_state(ui, changes_authorized))
        .route("/api", any(no_such_call))
        .route("/api/{*rest}", any(no_such_call));
    match cors {
        Some(cors) => api.layer(cors),
        None => api,
    }
}

/// Refuses a change (a POST) without this API's token before its body is read: a request
/// that may change nothing does not get to hold up to a body's bytes of memory.
async fn changes_authorized(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == axum::http::Method::POST {
        if let Some(refused) = ui.api_refusal(request.headers()) {
            return refused;
        }
    }
    next.run(request).await
}

/// The CORS answers for `origins` (`--api-cors-origin`): none without origins; an origin
/// that is not `scheme://host[:port]` is refused, naming it.
pub(super) fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allowed = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        let mut values = Vec::with_capacity(origins.len());
        for origin in origins {
            let (scheme, rest) = origin.split_once("://").unwrap_or(("", ""));
            let well_formed = matches!(scheme, "http" | "https")
                && !rest.is_empty()
                && !rest.contains(['/', '?', '#', ' '])
                && HeaderValue::from_str(origin).is_ok();
            if !well_formed {
                anyhow::bail!(
                    "--api-cors-origin {origin:?} is not an origin: use scheme://host[:port] with no path, \
                     e.g. https://app.example.com, or * for any"
                );
            }
            values.push(HeaderValue::from_str(origin)?);
        }
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static(IDEMPOTENCY_KEY)])
            .max_age(CORS_MAX_AGE),
    ))
}

/// Refuses a request with a query to a call that takes none.
async fn refuse_query(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.uri().query().is_some_and(|query| !query.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "this call takes no query parameters");
    }
    next.run(request).await
}

/// The run; one too large for one message without its input and outputs (`data_left_out`),
/// as `run get` prints it.
async fn run(State(ui): State<Arc<Ui>>, ApiPath(run_id): ApiPath<String>) -> Response {
    answer(ui.client.get_or_without_data(&RunId(run_id.into())).await.map(|(view, _)| view), StatusCode::OK)
}

/// The query of a read, as the call's request: each parameter a field of it (numbers as
/// numbers), and `label=key=value`, repeated, its `labels`. An unknown parameter or a
/// malformed value is refused, naming it.
fn query<T: DeserializeOwned>(pairs: Vec<(String, String)>, numbers: &[&str]) -> Result<T, Box<Response>> {
    let refuse = |message: String| Box::new(error(StatusCode::BAD_REQUEST, "invalid_request", &message));
    let mut fields = serde_json::Map::new();
    let mut labels = Vec::new();
    for (key, value) in pairs {
        if key == "labels" {
            return Err(refuse("labels is not a parameter: give each label as label=key=value".to_owned()));
        }
        if key != "label" && fields.contains_key(&key) {
            return Err(refuse(format!("{key} is given twice: give it once (only label may be repeated)")));
        }
        if key == "label" {
            let Some((label, label_value)) = value.split_once('=') else {
                return Err(refuse(format!("label={value}: write a label as label=key=value")));
            };
            labels.push((label.to_owned(), label_value.to_owned()));
        } else if numbers.contains(&key.as_str()) {
            let number = value.parse::<u64>().map_err(|error| match error.kind() {
                std::num::IntErrorKind::PosOverflow => {
                    refuse(format!("{key}={value}: too large (at most {})", u64::MAX))
                }
                _ => refuse(format!("{key}={value}: not a whole number")),
            })?;
            fields.insert(key, Value::from(number));
        } else {
            fields.insert(key, Value::String(value));
        }
    }
    if !labels.is_empty() {
        let labels = crate::args::labels_once(labels).map_err(refuse)?;
        fields.insert("labels".to_owned(), serde_json::json!(labels));
    }
    serde_json::from_value(Value::Object(fields)).map_err(|parse_error| {
        // The request's `labels` are written `label=` in a query.
        let message = parse_error.to_string().replace("`labels`", "`label`");
        refuse(format!("the query is not what this call takes: {message}"))
    })
}

async fn list(State(ui): State<Arc<Ui>>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    match query::<ListRuns>(pairs, &["since_ms", "until_ms", "limit"]) {
        Ok(request) => answer(ui.client.list(request).await, StatusCode::OK),
        Err(refused) => *refused,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

async fn history(
    State(ui): State<Arc<Ui>>,
    ApiPath(run_id): ApiPath<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    match query::<HistoryQuery>(pairs, &["after", "limit"]) {
        Ok(page) => answer(ui.client.history(&RunId(run_id.into()), page.after, page.limit).await, StatusCode::OK),
        Err(refused) => *refused,
    }
}

async fn flows(State(ui): State<Arc<Ui>>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    match query::<ListFlows>(pairs, &["limit"]) {
        Ok(page) => answer(ui.client.flows_page(page.cursor, page.limit).await, StatusCode::OK),
        Err(refused) => *refused,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowQuery {
    version: Option<u32>,
}

async fn flow(
    State(ui): State<Arc<Ui>>,
    ApiPath(name): ApiPath<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    match query::<FlowQuery>(pairs, &["version"]) {
        Ok(asked) => answer(ui.client.flow(&name, asked.version).await, StatusCode::OK),
        Err(refused) => *refused,
    }
}

async fn live(State(ui): State<Arc<Ui>>, ApiPath(run_id): ApiPath<String>) -> Response {
    let run_id = RunId(run_id.into());
    // A run that does not exist is a 404 now, not an empty stream. Its steps and status
    // are what the stream needs, not its data.
    let view = match ui.client.get_without_data(&run_id).await {
        Ok(view) => view,
        Err(error) => return refusal(&error),
    };
    // Each stream follows its run with reads of its own: their number is bounded.
    let Ok(slot) = Arc::clone(&ui.live_streams).try_acquire_owned() else {
        return overloaded(&format!("{LIVE_STREAMS_MAX} live streams are open already: try again later"));
    };
    let (events, mut received) = mpsc::channel::<Event>(LIVE_EVENTS_BUFFERED);
    let client = ui.client.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let reader_gone = events.clone();
        let follow = follow_live_output(&client, &view, None, LIVE_FOLLOW_MAX, |piece| {
            let event = Event::default().event("piece").data(piece_json(&piece).to_string());
            let sent = events.clone();
            // Waits while the reader is a buffer behind, for a while.
            async move {
                sent.send_timeout(event, LIVE_READER_WAIT).await.map_err(|refused| match refused {
                    SendTimeoutError::Timeout(_) => anyhow::anyhow!("the reader took nothing for {LIVE_READER_WAIT:?}"),
                    SendTimeoutError::Closed(_) => anyhow::anyhow!("the reader went away"),
                })
            }
        });
        let followed = tokio::select! {
            // The hour bounds a slow reader of a run that ended too.
            followed = tokio::time::timeout(LIVE_FOLLOW_MAX, follow) => followed.unwrap_or(Ok(None)),
            // A reader that went away ends the following at once, output or not.
            () = reader_gone.closed() => return,
        };
        let end = match followed {
            Ok(Some(status)) => json!({"status": status.as_str()}),
            Ok(None) => json!({"status": "running", "message": "followed for an hour: ask again to go on"}),
            Err(error) => json!({"status": "unknown", "message": format!("{error:#}")}),
        };
        let end = Event::default().event("end").data(end.to_string());
        let _ = events.send_timeout(end, LIVE_READER_WAIT).await;
    });
    let stream = futures::stream::poll_fn(move |context| {
        received.poll_recv(context).map(|event| event.map(Ok::<Event, Infallible>))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn start(
    State(ui): State<Arc<Ui>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if query.is_some_and(|query| !query.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a start takes no query parameters: put it all in the body",
        );
    }
    let start: StartRun = match change_request(&ui, &headers, body, None) {
        Ok(start) => start,
        Err(refused) => return *refused,
    };
    match ui.client.start(start).await {
        Ok(started) => {
            let status = if started.created { StatusCode::CREATED } else { StatusCode::OK };
            answer(Ok::<_, flowgrid_sdk::Error>(started), status)
        }
        Err(error) => refusal(&error),
    }
}

async fn signal(
    State(ui): State<Arc<Ui>>,
    ApiPath((run_id, step)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let data: Value = match change_request(&ui, &headers, body, Some(Value::Null)) {
        Ok(data) => data,
        Err(refused) => return *refused,
    };
    let run_id = RunId(run_id.into());
    // A client that sends its request again after a lost answer names it with the same key.
    let mut keys = headers.get_all(IDEMPOTENCY_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => None,
        (Some(key), None) => match std::str::from_utf8(key.as_bytes()).map(str::trim) {
            Ok(key) if !key.is_empty() => Some(key.to_owned()),
            _ => {
                let message = "the Idempotency-Key header must be text (UTF-8) that is not blank";
                return error(StatusCode::BAD_REQUEST, "invalid_request", message);
            }
        },
        (Some(_), Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "give the Idempotency-Key header once");
        }
    };
    let signalled = match key {
        Some(key) => ui.client.signal_with_id(&run_id, step, data, key).await,
        None => ui.client.signal(&run_id, step, data).await,
    };
    answer(signalled, StatusCode::OK)
}

/// The body of a cancel, pause, resume or redrive (`from` for a redrive only).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    from: Option<Vec<String>>,
}

/// `POST /api/runs/{id}/{cancel | pause | resume | redrive}`.
async fn change(
    State(ui): State<Arc<Ui>>,
    ApiPath((run_id, change)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !is_change(&change) {
        return no_such_call().await;
    }
    let body: ChangeBody = match change_request(&ui, &headers, body, Some(ChangeBody::default())) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    if body.from.is_some() && change != "redrive" {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "`from` is taken by a redrive only");
    }
    let run_id = RunId(run_id.into());
    let reason = |done: &str| body.reason.clone().unwrap_or_else(|| format!("{done} through the HTTP API"));
    match change.as_str() {
        "cancel" => answer(ui.client.cancel(&run_id, reason("cancelled")).await, StatusCode::OK),
        "pause" => answer(ui.client.pause(&run_id, reason("paused")).await, StatusCode::OK),
        "resume" => answer(ui.client.resume(&run_id, reason("resumed")).await, StatusCode::OK),
        _ => {
            let from = body.from.clone().unwrap_or_default();
            answer(ui.client.redrive_from(&run_id, from, reason("redriven")).await, StatusCode::OK)
        }
    }
}

impl Ui {
    /// Why a change is refused: the API changes nothing without a token, and takes only its own.
    fn api_refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(expected) = &self.api_token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this API is read-only: start the UI with --api-token (or FLOWGRID_API_TOKEN) to start, signal, pause, \
                 resume, cancel and redrive runs",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            // The scheme's name is case-insensitive (RFC 7235).
            .and_then(|value| value.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
            .map(|(_, token)| token.trim());
        match given {
            Some(given) if same_secret(given.as_bytes(), expected.as_bytes()) => None,
            Some(_) => Some(error(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is not this API's")),
            None => Some(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the API's token as `Authorization: Bearer <token>`",
            )),
        }
    }
}

/// Compares two secrets in a time that does not depend on where they differ.
pub(super) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |differ, (a, b)| differ | (a ^ b)) == 0
}

/// A JSON body, or the refusal that says what is wrong with it (boxed: a response is large).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|parse_error| {
        let message = format!("the body is not what this call takes: {parse_error}");
        Box::new(error(StatusCode::BAD_REQUEST, "invalid_request", &message))
    })
}

/// The grid's answer as JSON with `status`, or its refusal.
fn answer<T: Serialize>(outcome: Result<T, flowgrid_sdk::Error>, status: StatusCode) -> Response {
    match outcome {
        Ok(value) => match serde_json::to_vec(&value) {
            Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(encode_error) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &encode_error.to_string()),
        },
        Err(refused) => refusal(&refused),
    }
}

/// The grid's refusal as it gave it (code, message, issues, retryable); when the grid could
/// not be asked or did not answer, `unavailable`, and when its answer could not be read,
/// `internal`.
fn refusal(refused: &flowgrid_sdk::Error) -> Response {
    let (status, body) = refusal_body(refused);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The status and JSON body of [`refusal`]. An `unavailable` says whether to send the
/// request again: `retryable: false` when the grid may have applied it (a start without an
/// idempotency key or a redrive that got no answer in time, or that the grid refused so),
/// which the client reads back before sending it again; `retryable: true` otherwise.
fn refusal_body(refused: &flowgrid_sdk::Error) -> (StatusCode, Value) {
    let status = super::status_of(refused);
    let body = match refused.api() {
        // Its `retryable` is false for an `unavailable` that may have been applied.
        Some(api) => json!({ "error": api }),
        None if status == StatusCode::INTERNAL_SERVER_ERROR => {
            json!({"error": {"code": "internal", "message": refused.to_string(), "retryable": false}})
        }
        None => json!({"error": {
            "code": "unavailable",
            "message": refused.to_string(),
            "retryable": !refused.may_have_been_applied(),
        }}),
    };
    (status, body)
}

async fn method_not_allowed(method: Method) -> Response {
    let message = format!("{method} is not how this call is made: see docs/operations.md, \"The HTTP API\"");
    error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &message)
}

/// The changes `POST /api/runs/<id>/<change>` makes.
fn is_change(name: &str) -> bool {
    matches!(name, "cancel" | "pause" | "resume" | "redrive")
}

/// Another method on `/api/runs/<id>/<change>`: a change asked the wrong way, or no call.
async fn change_other_method(method: Method, ApiPath((_, change)): ApiPath<(String, String)>) -> Response {
    if is_change(&change) {
        method_not_allowed(method).await
    } else {
        no_such_call().await
    }
}

async fn no_such_call() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such API call: see docs/operations.md, \"The HTTP API\"")
}

/// What a call that changes the grid was sent, or its JSON refusal: without the API's
/// token, with a body that could not be read (over the bound, or not in time: `408
/// request_timeout`) or is not what the call takes. An empty body is `when_empty`, for the
/// calls that may have none.
fn change_request<T: DeserializeOwned>(
    ui: &Ui,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    when_empty: Option<T>,
) -> Result<T, Box<Response>> {
    if let Some(refused) = ui.api_refusal(headers) {
        return Err(Box::new(refused));
    }
    let body = body.map_err(|rejection| {
        if super::server::body_too_slow(&rejection) {
            let message = super::server::BodyTooSlow.to_string();
            return Box::new(error(StatusCode::REQUEST_TIMEOUT, "request_timeout", &message));
        }
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_request" };
        Box::new(error(status, code, &rejection.body_text()))
    })?;
    match when_empty {
        Some(empty) if body.is_empty() => Ok(empty),
        _ => parse(&body),
    }
}

/// A path's parameters, or the API's JSON refusal of them (a segment that is not UTF-8
/// once decoded, say), instead of axum's plain-text one.
struct ApiPath<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(error(rejection.status(), "invalid_request", &rejection.body_text())),
        }
    }
}

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The UI's own `429 overloaded`: nothing was done, so the request may be sent again
/// (`retryable: true`, and `Retry-After: 1`), as with the grid's own refusals.
pub(super) fn overloaded(message: &str) -> Response {
    let body = json!({"error": {"code": "overloaded", "message": message, "retryable": true}}).to_string();
    let headers = [(header::CONTENT_TYPE, "application/json"), (header::RETRY_AFTER, "1")];
    (StatusCode::TOO_MANY_REQUESTS, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!same_secret(b"", b"0123456789abcdef"));
    }

    /// A start without an idempotency key or a redrive that got no answer may have been
    /// applied: its `503 unavailable` says not to send it again as it is; a grid that could
    /// not be asked is worth asking again.
    #[test]
    fn an_unavailable_that_may_have_been_applied_is_not_retryable() {
        use flowgrid_sdk::{ApiError, Error, ErrorCode};
        let answered = |refused: &Error| {
            let (status, body) = refusal_body(refused);
            (status, body["error"]["code"].clone(), body["error"]["retryable"].clone())
        };
        let unavailable = |retryable: bool| (StatusCode::SERVICE_UNAVAILABLE, json!("unavailable"), json!(retryable));
        let unanswered = |what: &str| Error::Timeout { what: what.to_owned(), after: Duration::from_secs(15) };
        let start = unanswered(
            "request on flowgrid.api.run.start (1 try): the grid may have applied it: list the runs before starting \
             again",
        );
        assert!(start.may_have_been_applied(), "{start}");
        let owner_silent =
            ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "shard 2 did not answer") };
        for applied in [start, Error::Api(owner_silent)] {
            assert_eq!(answered(&applied), unavailable(false), "{applied}");
        }
        // A read that timed out, a grid nobody answers, a shard moving: send it again.
        let read = unanswered("request on flowgrid.api.run.get (3 tries)");
        let nobody = Error::Nats { context: "no coordinator answers".into(), source: "no responders".into() };
        let moving = Error::Api(ApiError::new(ErrorCode::Unavailable, "shard 2 is moving"));
        for retryable in [read, nobody, moving] {
            assert_eq!(answered(&retryable), unavailable(true), "{retryable}");
        }
    }

    #[tokio::test]
    async fn the_uis_own_overloaded_answer_says_to_send_it_again() {
        let answer = overloaded("256 live streams are open already: try again later");
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.headers().get(header::RETRY_AFTER).map(|value| value.as_bytes()), Some(&b"1"[..]));
        let body = axum::body::to_bytes(answer.into_body(), 4096).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((&body["error"]["code"], &body["error"]["retryable"]), (&json!("overloaded"), &json!(true)));
    }

    #[test]
    fn a_query_takes_labels_only_as_label_parameters() {
        let pairs =
            |list: &[(&str, &str)]| list.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
        let listed: ListRuns = query(pairs(&[("label", "a=1"), ("flow", "f")]), &[]).unwrap();
        assert_eq!((listed.labels.get("a").map(String::as_str), listed.flow.as_deref()), (Some("1"), Some("f")));
        for refused in [vec![("labels", "x"), ("label", "a=1")], vec![("label", "a=1"), ("labels", "x")]] {
            assert!(query::<ListRuns>(pairs(&refused), &[]).is_err(), "{refused:?}");
        }
    }
}
