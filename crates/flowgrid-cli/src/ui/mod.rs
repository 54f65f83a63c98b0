//! `flowgrid ui`: a web view of a grid: its coordinators and backlog, its flows drawn as
//! graphs, and its runs step by step, refreshed while they go. It talks to the grid only
//! through the API and the buckets `flowgrid status` reads, so it needs no access to a
//! coordinator's host. It changes nothing unless started with `--actions`: then its
//! forms deploy flows, start runs, send signals, pause, resume, cancel and redrive runs, each form carrying a
//! token of this process so that another site cannot post them on a user's behalf.

mod api;
mod dag;
mod pages;
mod server;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{CONTENT_SECURITY_POLICY, X_FRAME_OPTIONS};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Form;
use futures::{StreamExt, TryStreamExt};
use maud::Markup;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;

use flowgrid_model::{Issue, Labels, RunId};
use flowgrid_proto::{ListRuns, StartRun, WorkerRecord};
use flowgrid_sdk::Client;

use crate::args::UiArgs;
use crate::commands::{GridReader, NotJoined};
use crate::grid_view::{self, Backlog, GridSnapshot};
use crate::Session;
use server::{body_too_slow, bounded_body, serve_connections, BodyTooSlow};

/// The largest request body: a run input at the grid's 1 MiB payload limit, written in a
/// form (URL-encoded, each quote three bytes) or in JSON with every character escaped,
/// still fits; the grid refuses what is over its limit, naming it.
const BODY_BYTES_MAX: usize = 6 << 20;

/// Runs listed on the overview and on a flow's page.
const RECENT_RUNS: u32 = 20;
/// Flows on the overview at once; a link leads to the next ones.
const OVERVIEW_FLOWS: u32 = 100;
/// Runs on one page of the runs list.
const RUNS_PAGE: u32 = 50;
/// How long a stop (ctrl-c, SIGTERM) waits for requests under way.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a run's page waits for the live output it shows.
const LIVE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
struct Ui {
    client: Client,
    grid: GridReader,
    /// With `--actions`: the token every form must send back.
    token: Option<String>,
    /// With `--api-token`: the bearer token the HTTP API's changes must carry.
    api_token: Option<String>,
    /// Slots of the HTTP API's live streams.
    live_streams: Arc<tokio::sync::Semaphore>,
}

impl Ui {
    fn actions(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// Serves the UI and its HTTP API on `args.listen` until ctrl-c; `--actions` enables the
/// forms, `--api-token` the API's changes.
pub(crate) async fn serve(args: UiArgs, session: &Session) -> anyhow::Result<ExitCode> {
    let UiArgs { listen, actions, api_token, api_cors_origins, allowed_hosts } = args;
    let cors = api::cors(&api_cors_origins)?;
    // A client's `Authorization: Bearer` value is taken without surrounding whitespace (a
    // token read from a file often ends with a newline), so the token must have none.
    if api_token.as_ref().is_some_and(|token| token.trim() != token) {
        anyhow::bail!("--api-token starts or ends with whitespace, which no request could send: remove it");
    }
    if let Some(token) = api_token.as_ref().filter(|token| token.chars().count() < api::TOKEN_CHARS_MIN) {
        anyhow::bail!(
            "--api-token has {} characters; use at least {} (e.g. `openssl rand -hex 32`)",
            token.chars().count(),
            api::TOKEN_CHARS_MIN
        );
    }
    let client = session.client().await?;
    let grid = GridReader::connect(session).await?;
    let token = actions.then(|| uuid::Uuid::new_v4().simple().to_string());
    let api_on = api_token.is_some();
    let live_streams = Arc::new(tokio::sync::Semaphore::new(api::LIVE_STREAMS_MAX));
    let ui = Arc::new(Ui { client, grid, token, api_token, live_streams });
    let app = api::routes(Arc::clone(&ui), cors)
        .route("/", get(overview))
        .route("/deploy", get(deploy_form))
        .route("/flows", post(deploy))
        .route("/flows/{name}", get(flow))
        .route("/flows/{name}/pause", post(pause_flow))
        .route("/flows/{name}/resume", post(resume_flow))
        .route("/runs", get(runs).post(start))
        .route("/runs/{run_id}", get(run))
        .route("/runs/{run_id}/signal", post(signal))
        .route("/runs/{run_id}/complete", post(complete))
        .route("/runs/{run_id}/cancel", post(cancel))
        .route("/runs/{run_id}/redrive", post(redrive))
        .route("/runs/{run_id}/pause", post(pause))
        .route("/runs/{run_id}/resume", post(resume))
        // Every route is in: the routes without a fallback of their own (the UI's) take this.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(server::body_readers(), bounded_body))
        // No other site may show these pages in a frame (and trick a click on a button).
        .layer(SetResponseHeaderLayer::overriding(X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(SetResponseHeaderLayer::overriding(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        ))
        .with_state(ui);
    let hosts = Arc::new(HostPolicy::new(listen, &allowed_hosts)?);
    let app = app.layer(axum::middleware::from_fn_with_state(hosts, known_hosts_only));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: pick a free address with --listen"))?;
    let address = listener.local_addr()?;
    let mode = if actions { "with actions" } else { "read-only" };
    let api = if api_on { "changes with its token" } else { "read-only" };
    eprintln!(
        "flowgrid UI on http://{address}/ ({mode}), HTTP API on http://{address}/api/ ({api}; NATS {}, prefix {:?}); \
         ctrl-c or SIGTERM stops it",
        flowgrid_sdk::redact(&session.nats_url),
        session.prefix
    );
    let stopping = CancellationToken::new();
    let server = serve_connections(listener, app, stopping.clone());
    let stop = async {
        if crate::commands::interrupted().await.is_err() {
            return std::future::pending().await;
        }
        // Requests under way finish; a live stream (which follows a run up to an hour)
        // does not hold the stop longer than this.
        stopping.cancel();
        tokio::time::sleep(STOP_WAIT).await;
    };
    tokio::select! {
        () = server => {}
        () = stop => eprintln!("stopped; live streams still open were cut"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewQuery {
    /// The overview's flows start after this one (the link to the next ones).
    flows_after: Option<String>,
}

async fn overview(State(ui): State<Arc<Ui>>, UiQuery(query): UiQuery<OverviewQuery>) -> Response {
    let (snapshot, backlog, workers, flows, recent, limits) = tokio::join!(
        ui.grid.snapshot(),
        ui.grid.backlog(),
        ui.grid.workers(),
        ui.client.flows_page(query.flows_after.filter(|after| !after.is_empty()), Some(OVERVIEW_FLOWS)),
        ui.client.list(ListRuns { limit: Some(RECENT_RUNS), ..Default::default() }),
        ui.client.limits(None)
    );
    let status = grid_status(snapshot, backlog, workers, |snapshot, backlog, workers| {
        crate::commands::status_text(&ui.grid, snapshot, backlog, workers)
    });
    let flows = flows.map_err(|error| error.to_string());
    let recent = recent.map(|list| list.runs).map_err(|error| error.to_string());
    let limits = limits.map_err(|error| error.to_string());
    page(pages::overview(&status, &flows, &recent, &limits, ui.actions()))
}

/// The overview's account of the grid, as `flowgrid status` prints it (`status_text`): its
/// members and shards, its backlog and its workers. A grid no coordinator joined yet
/// ([`NotJoined`]) still has a backlog to show; a failure to read the coordinators or the
/// workers is said as such, not taken for none of them.
fn grid_status(
    snapshot: anyhow::Result<GridSnapshot>,
    backlog: anyhow::Result<Backlog>,
    workers: anyhow::Result<Vec<WorkerRecord>>,
    status_text: impl FnOnce(Option<&GridSnapshot>, &Backlog, &[WorkerRecord]) -> String,
) -> String {
    let backlog = match backlog {
        Ok(backlog) => backlog,
        Err(error) => return format!("cannot read the grid's streams: {error:#}"),
    };
    let (workers, workers_unread) = match workers {
        Ok(workers) => (workers, None),
        Err(error) => (Vec::new(), Some(error)),
    };
    let mut text = match snapshot {
        Ok(snapshot) => status_text(Some(&snapshot), &backlog, &workers),
        Err(error) if error.downcast_ref::<NotJoined>().is_some() => status_text(None, &backlog, &workers),
        // The members' line, then the rest as `status_text` lays it out.
        Err(error) => format!(
            "members: cannot read the coordinators: {error:#}\n\n{}{}",
            grid_view::render_backlog(&backlog),
            grid_view::render_workers_summary(&workers)
        ),
    };
    if let Some(error) = workers_unread {
        // The text ends with the workers' line, which says none are listed: replace it.
        let none_listed = grid_view::render_workers_summary(&[]);
        if text.ends_with(&none_listed) {
            text.truncate(text.len() - none_listed.len());
        }
        text.push_str(&format!("workers: cannot read the workers: {error:#}\n"));
    }
    text
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowQuery {
    version: Option<u32>,
}

async fn flow(State(ui): State<Arc<Ui>>, Path(name): Path<String>, UiQuery(query): UiQuery<FlowQuery>) -> Response {
    let recent = ListRuns { flow: Some(name.clone()), limit: Some(RECENT_RUNS), ..Default::default() };
    let (info, recent, limits) =
        tokio::join!(ui.client.flow(&name, query.version), ui.client.list(recent), ui.client.limits(Some(&name)));
    match info {
        Ok(info) => {
            let recent = recent.map(|list| list.runs).map_err(|error| error.to_string());
            page(pages::flow(&info, &recent, &limits.map_err(|error| error.to_string()), ui.actions()))
        }
        Err(error) => api_failure(&error, None),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    flow: Option<String>,
    status: Option<String>,
    parent: Option<String>,
    /// `key=value`: only runs with this label.
    label: Option<String>,
    /// Only runs started at or after this time, and before `until` (as `--since` reads them).
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
}

async fn runs(State(ui): State<Arc<Ui>>, UiQuery(query): UiQuery<RunsQuery>) -> Response {
    let flow = query.flow.filter(|flow| !flow.is_empty());
    let status = match query.status.as_deref().filter(|status| !status.is_empty()) {
        None => None,
        Some(text) => match crate::args::parse_status(text) {
            Ok(status) => Some(status),
            Err(error) => return failure(StatusCode::BAD_REQUEST, &error),
        },
    };
    let parent = query.parent.filter(|parent| !parent.is_empty()).map(|parent| RunId(parent.into()));
    let label = match query.label.as_deref().filter(|label| !label.is_empty()) {
        None => None,
        Some(text) => match crate::args::parse_label(text) {
            Ok(label) => Some(label),
            Err(error) => return failure(StatusCode::BAD_REQUEST, &error),
        },
    };
    let [since, until] = match [query.since, query.until]
        .map(|time| time.filter(|time| !time.is_empty()).map(|time| flowgrid_sdk::parse_time(&time)).transpose())
    {
        [Ok(since), Ok(until)] => [since, until],
        [Err(error), _] | [_, Err(error)] => return failure(StatusCode::BAD_REQUEST, &error),
    };
    let filter =
        pages::RunsFilter { flow: flow.clone(), status, parent: parent.clone(), label: label.clone(), since, until };
    let labels = label.into_iter().collect();
    let list = ListRuns {
        parent,
        flow,
        status,
        labels,
        since_ms: since,
        until_ms: until,
        limit: Some(RUNS_PAGE),
        cursor: query.cursor,
    };
    match ui.client.list(list).await {
        Ok(list) => page(pages::runs(&filter, &list)),
        Err(error) => api_failure(&error, None),
    }
}

async fn run(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>) -> Response {
    let (view, left_out) = match ui.client.get_or_without_data(&RunId(run_id.into())).await {
        Ok(found) => found,
        Err(error) => return api_failure(&error, None),
    };
    // The run's own version, for its graph; a flow deleted since cannot be, but be lenient.
    let (flow, history) = tokio::join!(
        ui.client.flow(&view.flow, Some(view.version)),
        ui.client.history(&view.run_id, None, Some(pages::HISTORY_SHOWN))
    );
    let definition = flow.ok().map(|info| info.definition);
    let live = live_output(&ui.client, &view.run_id).await;
    let left_out = left_out.map(|refusal| refusal.message);
    page(pages::run(&view, definition.as_ref(), history.ok().as_ref(), &live, ui.actions(), left_out.as_deref()))
}

/// The first pieces of live output the grid keeps of a run, as many as its page shows
/// ([`pages::LiveShown`]); complete and empty when it keeps none. What cannot be read (the
/// page shows the rest of the run) leaves them incomplete: the page says where to read them.
async fn live_output(client: &Client, run_id: &RunId) -> pages::LiveShown {
    use async_nats::jetstream::context::GetStreamErrorKind;
    let subjects = client.subjects();
    let stream = match client.jetstream().get_stream(subjects.live_stream()).await {
        Ok(stream) => stream,
        // A grid whose coordinators could not make the stream keeps no live output.
        Err(error)
            if matches!(error.kind(), GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return pages::LiveShown::none_kept();
        }
        Err(error) => {
            tracing::debug!(run = %run_id, error = %error, "cannot open the live output stream");
            return pages::LiveShown::default();
        }
    };
    let counts = async {
        let counts: Vec<(String, usize)> =
            stream.info_with_subjects(subjects.live_of_run(run_id.as_str())).await?.try_collect().await?;
        Ok::<_, async_nats::Error>(counts)
    };
    let kept = match counts.await {
        Ok(counts) => counts.iter().map(|(_, count)| count).sum::<usize>(),
        Err(error) => {
            tracing::debug!(run = %run_id, error = %error, "cannot count the run's live output");
            return pages::LiveShown::default();
        }
    };
    if kept == 0 {
        return pages::LiveShown::none_kept();
    }
    let mut shown = pages::LiveShown::default();
    let tail = match client.tail(run_id, None).await {
        Ok(tail) => tail,
        Err(error) => {
            tracing::debug!(run = %run_id, error = %error, "cannot read the run's live output");
            return shown;
        }
    };
    let reading = async {
        // The tail follows the run: it is read as far as the pieces counted.
        let mut tail = std::pin::pin!(tail.take(kept.min(pages::LIVE_PIECES_SHOWN)));
        while let Some(piece) = tail.next().await {
            match piece {
                Ok(piece) => {
                    if !shown.push(piece) {
                        break;
                    }
                }
                Err(error) => tracing::debug!(run = %run_id, error = %error, "cannot read a piece of live output"),
            }
        }
    };
    // What came in time is shown; the page reloads while the run goes.
    let in_time = tokio::time::timeout(LIVE_READ_TIMEOUT, reading).await.is_ok();
    shown.complete = in_time && shown.pieces.len() == kept;
    shown
}

async fn deploy_form(State(ui): State<Arc<Ui>>) -> Response {
    match ui.actions() {
        Some(token) => page(pages::deploy(token)),
        None => read_only(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployForm {
    token: String,
    definition: String,
}

async fn deploy(State(ui): State<Arc<Ui>>, UiForm(form): UiForm<DeployForm>) -> Response {
    const BACK: &str = "/deploy";
    if let Some(refused) = ui.refusal(&form.token, BACK) {
        return refused;
    }
    after_action(ui.client.deploy(form.definition).await, BACK, |deployed| {
        format!("/flows/{}?version={}", deployed.name, deployed.version)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartForm {
    token: String,
    flow: String,
    #[serde(default)]
    input: String,
    /// Labels as `key=value`, separated by commas.
    #[serde(default)]
    labels: String,
    /// A start time as `run start --at` takes it; empty: now.
    #[serde(default)]
    at: String,
    /// The key the form's page was shown with (see [`start_key`]): the same form sent twice
    /// (a double click, a reload that posts again) starts one run. Empty: every post starts one.
    #[serde(default)]
    key: String,
}

async fn start(State(ui): State<Arc<Ui>>, UiForm(form): UiForm<StartForm>) -> Response {
    let back = format!("/flows/{}", form.flow);
    if let Some(refused) = ui.refusal(&form.token, &back) {
        return refused;
    }
    let input = match json_field("input", &form.input) {
        Ok(input) => input,
        Err(message) => return form_failure(StatusCode::BAD_REQUEST, &message, &back),
    };
    let labels = form.labels.split(',').map(str::trim).filter(|label| !label.is_empty()).map(crate::args::parse_label);
    let labels = match labels.collect::<Result<Vec<_>, _>>().and_then(crate::args::labels_once) {
        Ok(labels) => labels,
        Err(message) => return form_failure(StatusCode::BAD_REQUEST, &format!("labels: {message}"), &back),
    };
    let at = form.at.trim();
    let start_at_ms = match at {
        "" => None,
        at => match flowgrid_sdk::parse_start_time(at) {
            Ok(at_ms) => Some(at_ms),
            Err(message) => return form_failure(StatusCode::BAD_REQUEST, &format!("start at: {message}"), &back),
        },
    };
    let idempotency_key =
        Some(&form.key).filter(|key| !key.is_empty()).map(|key| start_key(key, &form.flow, &input, &labels, at));
    let start = StartRun { flow: form.flow.clone(), version: None, input, idempotency_key, labels, start_at_ms };
    match ui.client.start(start).await {
        // The same form sent again: its run, and a page that says it was not started again.
        Ok(started) if !started.created => page(pages::started_already(&started, &back)),
        started => after_action(started, &back, |started| format!("/runs/{}", started.run_id)),
    }
}

/// The namespace of [`start_key`]'s digests.
const START_KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2b7d_90c4_61e3_4a58_b0f2_8c1d_e5a3_7f96);

/// The idempotency key of a start form: the key its page was shown with, and a digest of
/// what the form asks (the flow, the input, the labels, and the start time as written, so
/// that `2h` sent twice is the same form). The same form sent twice starts one run; sent
/// again with another input (back, edit, send), it starts another.
fn start_key(page_key: &str, flow: &str, input: &serde_json::Value, labels: &Labels, at: &str) -> String {
    let asked = serde_json::json!([flow, input, labels, at]).to_string();
    format!("{page_key}/{}", uuid::Uuid::new_v5(&START_KEY_NAMESPACE, asked.as_bytes()).simple())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalForm {
    token: String,
    step: String,
    #[serde(default)]
    data: String,
}

async fn signal(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>, UiForm(form): UiForm<SignalForm>) -> Response {
    let back = format!("/runs/{run_id}");
    if let Some(refused) = ui.refusal(&form.token, &back) {
        return refused;
    }
    let data = match json_field("data", &form.data) {
        Ok(data) => data,
        Err(message) => return form_failure(StatusCode::BAD_REQUEST, &message, &back),
    };
    match ui.client.signal(&RunId(run_id.clone().into()), form.step, data).await {
        Ok(signalled) if !signalled.applied => form_failure(
            StatusCode::CONFLICT,
            &format!(
                "not applied: step {} took a signal already, timed out, or the run ended ({})",
                signalled.step,
                signalled.status.as_str()
            ),
            &back,
        ),
        signalled => after_action(signalled, &back, |_| back.clone()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteForm {
    token: String,
    /// The async task's token, as its step's progress shows it.
    task_token: String,
    #[serde(default)]
    output: String,
    /// An error code: fail the attempt instead (not retried).
    #[serde(default)]
    error: String,
}

/// Completes a step handed off as an async task, with an output or an error code.
async fn complete(
    State(ui): State<Arc<Ui>>,
    Path(run_id): Path<String>,
    UiForm(form): UiForm<CompleteForm>,
) -> Response {
    let back = format!("/runs/{run_id}");
    if let Some(refused) = ui.refusal(&form.token, &back) {
        return refused;
    }
    let task_token = match flowgrid_sdk::TaskToken::decode(&form.task_token) {
        Ok(task_token) if task_token.attempt.run_id.as_str() == run_id => task_token,
        Ok(task_token) => {
            let message = format!("the task token is of run {}, not of run {run_id}", task_token.attempt.run_id);
            return form_failure(StatusCode::BAD_REQUEST, &message, &back);
        }
        Err(problem) => return form_failure(StatusCode::BAD_REQUEST, &problem, &back),
    };
    let outcome = match form.error.trim() {
        "" => match json_field("output", &form.output) {
            Ok(output) => Ok(output),
            Err(message) => return form_failure(StatusCode::BAD_REQUEST, &message, &back),
        },
        code => Err(flowgrid_sdk::TaskError {
            code: code.to_owned(),
            message: "failed from the web UI".to_owned(),
            retryable: false,
        }),
    };
    match ui.client.complete_task(&task_token, outcome).await {
        Ok(false) => form_failure(
            StatusCode::CONFLICT,
            "not applied: the task's attempt is no longer open (completed already, timed out, or its run ended)",
            &back,
        ),
        completed => after_action(completed, &back, |_| back.clone()),
    }
}

/// A form that carries the token and, optionally, why (cancel, pause, resume).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenForm {
    token: String,
    #[serde(default)]
    reason: String,
}

/// The reason a form gives, or `default` when it gives none.
fn reason_or(given: &str, default: &str) -> String {
    let given = given.trim();
    if given.is_empty() {
        default.to_owned()
    } else {
        given.to_owned()
    }
}

/// A form's fields, or the UI's error page saying what is wrong: a read-only UI takes no
/// form at all (whatever it holds), else a field missing, a body that is not a form, one
/// over [`BODY_BYTES_MAX`], one that did not come in time (408).
struct UiForm<T>(T);

impl<T: DeserializeOwned> FromRequest<Arc<Ui>> for UiForm<T> {
    type Rejection = Response;

    async fn from_request(request: Request, ui: &Arc<Ui>) -> Result<Self, Response> {
        let back = form_page(request.uri().path());
        let refuse = |status: StatusCode, message: &str| match &back {
            Some(back) => form_failure(status, message, back),
            None => failure(status, message),
        };
        if ui.token.is_none() {
            return Err(refuse(StatusCode::FORBIDDEN, READ_ONLY));
        }
        match Form::<T>::from_request(request, ui).await {
            Ok(Form(form)) => Ok(UiForm(form)),
            Err(rejection) if body_too_slow(&rejection) => {
                Err(refuse(StatusCode::REQUEST_TIMEOUT, &BodyTooSlow.to_string()))
            }
            Err(rejection) => Err(refuse(rejection.status(), &rejection.body_text())),
        }
    }
}

/// The page whose form is sent to `path`: a run's or a flow's page for their buttons, the
/// deploy page for `/flows`; none for another path (a start names its flow in the form).
fn form_page(path: &str) -> Option<String> {
    if path == "/flows" {
        return Some("/deploy".to_owned());
    }
    let mut segments = path.strip_prefix('/')?.split('/');
    match (segments.next(), segments.next(), segments.next(), segments.next()) {
        (Some(kind @ ("runs" | "flows")), Some(id), Some(action), None) if !id.is_empty() && !action.is_empty() => {
            Some(format!("/{kind}/{id}"))
        }
        _ => None,
    }
}

/// A method a page does not take: above all a GET of a form's target (the address bar after
/// a form's failure, a bookmark, a reload), answered with a link to the form's page.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    match form_page(path) {
        Some(back) => form_failure(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} is no page: a form of {back} sends its request there; open {back} to send it"),
            &back,
        ),
        None => failure(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not how {path} is asked for")),
    }
}

/// A page's query, or the UI's error page saying what is wrong with it: a parameter the
/// page does not take, one given twice, a malformed value.
struct UiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for UiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(UiQuery(query)),
            Err(rejection) => Err(failure(rejection.status(), &rejection.body_text())),
        }
    }
}

/// Sends `action` if the form carries this UI's token, then shows `back`, or a page that
/// says why nothing changed (the refusal, or a request the run had no use for).
async fn token_action<T: Outcome>(
    ui: &Ui,
    token: &str,
    action: impl std::future::Future<Output = flowgrid_sdk::Result<T>>,
    back: String,
) -> Response {
    if let Some(refused) = ui.refusal(token, &back) {
        return refused;
    }
    match action.await {
        Ok(done) => match done.unchanged() {
            Some(why) => form_failure(StatusCode::CONFLICT, &format!("nothing changed: {why}"), &back),
            None => Redirect::to(&back).into_response(),
        },
        Err(error) => api_failure(&error, Some(&back)),
    }
}

/// A reply to a form's request: why it changed nothing, if it did not.
trait Outcome {
    fn unchanged(&self) -> Option<String>;
}

impl Outcome for flowgrid_proto::RunCancelled {
    fn unchanged(&self) -> Option<String> {
        (!self.applied).then(|| format!("the run had already ended ({})", self.status.as_str()))
    }
}

impl Outcome for flowgrid_proto::RunPaused {
    fn unchanged(&self) -> Option<String> {
        match (self.applied, self.paused, self.status.is_terminal()) {
            (true, _, _) => None,
            (false, _, true) => Some(format!("the run has ended ({})", self.status.as_str())),
            (false, true, false) => Some("the run is paused already".to_owned()),
            (false, false, false) => Some("the run is not paused".to_owned()),
        }
    }
}

impl Outcome for flowgrid_proto::FlowPaused {
    fn unchanged(&self) -> Option<String> {
        match (self.applied, self.paused) {
            (true, _) => None,
            (false, true) => Some(format!("flow {} is paused already", self.name)),
            (false, false) => Some(format!("flow {} is not paused", self.name)),
        }
    }
}

impl Outcome for flowgrid_proto::RunRedriven {
    fn unchanged(&self) -> Option<String> {
        None
    }
}

async fn cancel(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>, UiForm(form): UiForm<TokenForm>) -> Response {
    let run = RunId(run_id.clone().into());
    let cancel = ui.client.cancel(&run, reason_or(&form.reason, "cancelled from the web UI"));
    token_action(&ui, &form.token, cancel, format!("/runs/{run_id}")).await
}

async fn pause(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>, UiForm(form): UiForm<TokenForm>) -> Response {
    let run = RunId(run_id.clone().into());
    let pause = ui.client.pause(&run, reason_or(&form.reason, "paused from the web UI"));
    token_action(&ui, &form.token, pause, format!("/runs/{run_id}")).await
}

async fn resume(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>, UiForm(form): UiForm<TokenForm>) -> Response {
    let run = RunId(run_id.clone().into());
    let resume = ui.client.resume(&run, reason_or(&form.reason, "resumed from the web UI"));
    token_action(&ui, &form.token, resume, format!("/runs/{run_id}")).await
}

/// A redrive: from the steps that did not succeed, and from step `from` if one is chosen.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveForm {
    token: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    from: String,
}

async fn redrive(State(ui): State<Arc<Ui>>, Path(run_id): Path<String>, UiForm(form): UiForm<RedriveForm>) -> Response {
    let run = RunId(run_id.clone().into());
    let from = if form.from.is_empty() { Vec::new() } else { vec![form.from] };
    let redrive = ui.client.redrive_from(&run, from, reason_or(&form.reason, "redriven from the web UI"));
    token_action(&ui, &form.token, redrive, format!("/runs/{run_id}")).await
}

async fn pause_flow(State(ui): State<Arc<Ui>>, Path(name): Path<String>, UiForm(form): UiForm<TokenForm>) -> Response {
    let pause = ui.client.pause_flow(&name, reason_or(&form.reason, "paused from the web UI"));
    token_action(&ui, &form.token, pause, format!("/flows/{name}")).await
}

async fn resume_flow(State(ui): State<Arc<Ui>>, Path(name): Path<String>, UiForm(form): UiForm<TokenForm>) -> Response {
    let resume = ui.client.resume_flow(&name, reason_or(&form.reason, "resumed from the web UI"));
    token_action(&ui, &form.token, resume, format!("/flows/{name}")).await
}

impl Ui {
    /// Why a form of page `back` is refused: a form is taken only with actions on and this
    /// process's token. The refusal links to `back`, which, opened again, has the token of now.
    fn refusal(&self, token: &str, back: &str) -> Option<Response> {
        match &self.token {
            None => Some(form_failure(StatusCode::FORBIDDEN, READ_ONLY, back)),
            Some(expected) if api::same_secret(token.as_bytes(), expected.as_bytes()) => None,
            Some(_) => Some(form_failure(
                StatusCode::FORBIDDEN,
                &format!(
                    "the form's token is not this UI's (it restarted, or the form came from another site): open {back} \
                     again and send the form from there"
                ),
                back,
            )),
        }
    }
}

const READ_ONLY: &str = "this UI is read-only: start it with `flowgrid ui --actions` to deploy, start, signal, pause, \
                         resume, cancel and redrive";

fn read_only() -> Response {
    failure(StatusCode::FORBIDDEN, READ_ONLY)
}

/// A JSON form field; empty is null. The error says which field and why.
fn json_field(name: &str, text: &str) -> Result<serde_json::Value, String> {
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(text).map_err(|error| format!("the {name} is not valid JSON: {error}"))
}

/// Where a form's action leads: the page it changed, or a page that says why it failed,
/// with a link to `back`, the form's page.
fn after_action<T>(outcome: Result<T, flowgrid_sdk::Error>, back: &str, page_of: impl FnOnce(T) -> String) -> Response {
    match outcome {
        Ok(done) => Redirect::to(&page_of(done)).into_response(),
        Err(error) => api_failure(&error, Some(back)),
    }
}

fn page(markup: Markup) -> Response {
    markup.into_response()
}

/// The HTTP status a refusal of the grid calls for.
fn status_of(error: &flowgrid_sdk::Error) -> StatusCode {
    match error.api().map(|refusal| refusal.code) {
        Some(flowgrid_sdk::ErrorCode::NotFound) => StatusCode::NOT_FOUND,
        Some(flowgrid_sdk::ErrorCode::InvalidRequest | flowgrid_sdk::ErrorCode::InvalidDefinition) => {
            StatusCode::BAD_REQUEST
        }
        Some(flowgrid_sdk::ErrorCode::PayloadTooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
        Some(flowgrid_sdk::ErrorCode::Conflict) => StatusCode::CONFLICT,
        Some(flowgrid_sdk::ErrorCode::Overloaded) => StatusCode::TOO_MANY_REQUESTS,
        // Final: a client must not take it for a pause and retry.
        Some(flowgrid_sdk::ErrorCode::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
        None if matches!(error, flowgrid_sdk::Error::Proto(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A refusal of the grid as a page with the status it calls for and the problems it located
/// (of a definition, of an input against its flow's `input_schema`); with a link to `back`,
/// the page of the form that asked, if one did.
fn api_failure(error: &flowgrid_sdk::Error, back: Option<&str>) -> Response {
    let status = status_of(error);
    let issues: &[Issue] = error.api().map_or(&[], |refusal| &refusal.issues);
    (status, pages::failure(status.as_u16(), &error.to_string(), issues, back)).into_response()
}

/// The names a request may address the UI by (its `Host`): loopback names always, IP
/// addresses unless the UI listens on a loopback address, and the `--allowed-host` names.
/// A page of another name could be a site whose name was made to resolve to this host (DNS
/// rebinding), which would then read the pages and their forms' token as the same origin.
struct HostPolicy {
    loopback: bool,
    allowed: Vec<String>,
}

impl HostPolicy {
    /// The policy for a UI on `listen` that also answers for `allowed` (names as
    /// `--allowed-host` gives them); refused when one is not a bare host name.
    fn new(listen: std::net::SocketAddr, allowed: &[String]) -> anyhow::Result<HostPolicy> {
        let mut names = Vec::new();
        for given in allowed {
            let name = host_name(given.trim());
            if name.is_empty() || name.contains([':', '/', '@']) {
                anyhow::bail!(
                    "--allowed-host {given:?} is not a host name: give the name alone, as in `--allowed-host \
                     flowgrid.example.com` (no scheme, port or path)"
                );
            }
            names.push(name);
        }
        Ok(HostPolicy { loopback: listen.ip().is_loopback(), allowed: names })
    }

    /// Whether a request with `host` (its `Host` header, if it has one) may be answered. A
    /// `Host` that is not plain ASCII text names no host the UI answers for: it is refused,
    /// not taken for a missing one.
    fn allows_header(&self, host: Option<&HeaderValue>) -> bool {
        match host.map(HeaderValue::to_str) {
            None => self.allows(""),
            Some(Ok(host)) => self.allows(host),
            Some(Err(_)) => false,
        }
    }

    fn allows(&self, host: &str) -> bool {
        // A request without a `Host` (HTTP/1.0: a load balancer's health check) does not
        // come from a browser, so it cannot be a page of another site.
        if host.is_empty() {
            return true;
        }
        let name = host_name(host);
        // An IPv6 address's zone (`fe80::1%eth0`, `%25` in a URL) is no part of the address.
        let address = name.split_once('%').map_or(name.as_str(), |(address, _)| address);
        let ip = address.parse::<std::net::IpAddr>().ok();
        name == "localhost"
            || name.ends_with(".localhost")
            || ip.is_some_and(|ip| ip.is_loopback() || !self.loopback)
            || self.allowed.contains(&name)
    }
}

async fn known_hosts_only(
    axum::extract::State(policy): axum::extract::State<Arc<HostPolicy>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(axum::http::header::HOST);
    if policy.allows_header(host) {
        return next.run(request).await;
    }
    let host = host.map(|host| String::from_utf8_lossy(host.as_bytes())).unwrap_or_default();
    let how = if policy.loopback {
        "this UI listens on a loopback address and answers for localhost, 127.0.0.1 and the names of --allowed-host: \
         open it as http://127.0.0.1:<port>/"
    } else {
        "this UI answers for its IP addresses, localhost and the names of --allowed-host: open it by its address, or \
         start it with --allowed-host <name>"
    };
    let message = format!("{how} (this request was for {host:?})");
    // Under /api/ every answer is JSON, a refusal too.
    if request.uri().path().starts_with("/api") {
        return api::error(StatusCode::FORBIDDEN, "forbidden", &message);
    }
    failure(StatusCode::FORBIDDEN, &message)
}

/// The name of a `Host` header, lowercase, without its port, an IPv6 address's brackets
/// or a fully qualified name's last dot.
fn host_name(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.strip_prefix('[').and_then(|name| name.strip_suffix(']')).unwrap_or(name);
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn failure(status: StatusCode, message: &str) -> Response {
    (status, pages::failure(status.as_u16(), message, &[], None)).into_response()
}

/// The failure of a form: the page says why and links to `back`, the page the form is on
/// (the address bar holds the form's target, which is no page to reload).
fn form_failure(status: StatusCode, message: &str, back: &str) -> Response {
    (status, pages::failure(status.as_u16(), message, &[], Some(back))).into_response()
}

#[cfg(test)]
mod tests {
    use super::{form_page, grid_status, start_key, status_of, HostPolicy, NotJoined};
    use crate::grid_view::{render_backlog, render_workers_summary, Backlog, GridSnapshot};
    use axum::http::{HeaderValue, StatusCode};
    use flowgrid_proto::WorkerRecord;
    use flowgrid_sdk::{ApiError, Error, ErrorCode};
    use serde_json::json;

    /// As `flowgrid status`: only a grid no coordinator joined has no members to show; a
    /// failure to read the coordinators or the workers is said, not taken for none.
    #[test]
    fn the_overview_says_when_it_cannot_read_the_coordinators_or_the_workers() {
        // `status_text`'s lay-out: the members' line, a blank line, the backlog, the workers.
        let laid_out = |snapshot: Option<&GridSnapshot>, backlog: &Backlog, workers: &[WorkerRecord]| {
            let members = if snapshot.is_some() { "members: 0" } else { "members: none; no coordinator has joined" };
            format!("{members}\n\n{}{}", render_backlog(backlog), render_workers_summary(workers))
        };
        let not_joined = || {
            let (nats_url, prefix) = ("nats://127.0.0.1:4222".to_owned(), "flowgrid".to_owned());
            anyhow::Error::from(NotJoined { nats_url, prefix, bucket: "FLOWGRID_MEMBERS".to_owned() })
        };
        let lost = |what: &str| anyhow::anyhow!("connection lost").context(format!("cannot read bucket {what}"));
        let none_listed = render_workers_summary(&[]);

        let text = grid_status(Err(not_joined()), Ok(Backlog::default()), Ok(Vec::new()), laid_out);
        assert!(text.starts_with("members: none; no coordinator has joined\n") && text.ends_with(&none_listed));

        let text = grid_status(Err(lost("FLOWGRID_MEMBERS")), Ok(Backlog::default()), Ok(Vec::new()), laid_out);
        let unread = "members: cannot read the coordinators: cannot read bucket FLOWGRID_MEMBERS: connection lost\n\n";
        assert!(text.starts_with(unread), "{text}");
        assert!(text.contains(&render_backlog(&Backlog::default())) && text.ends_with(&none_listed), "{text}");
        assert!(!text.contains("no coordinator has joined"), "{text}");

        let snapshot = Ok(GridSnapshot::default());
        let text = grid_status(snapshot, Ok(Backlog::default()), Err(lost("FLOWGRID_WORKERS")), laid_out);
        assert!(text.starts_with("members: 0\n"), "{text}");
        let unread = "\nworkers: cannot read the workers: cannot read bucket FLOWGRID_WORKERS: connection lost\n";
        assert!(text.ends_with(unread) && !text.contains(&none_listed), "{text}");

        let text = grid_status(Err(not_joined()), Err(lost("FLOWGRID_TASKS")), Err(lost("FLOWGRID_WORKERS")), laid_out);
        assert_eq!(text, "cannot read the grid's streams: cannot read bucket FLOWGRID_TASKS: connection lost");
    }

    #[test]
    fn a_start_forms_key_is_its_pages_with_what_it_asks() {
        let labels = [("customer".to_owned(), "acme".to_owned())].into();
        let asked = start_key("ui-1", "f", &json!({"a": 1}), &labels, "2h");
        assert_eq!(asked, start_key("ui-1", "f", &json!({"a": 1}), &labels, "2h"), "the same form, the same key");
        assert!(asked.starts_with("ui-1/"), "{asked}");
        for other in [
            start_key("ui-2", "f", &json!({"a": 1}), &labels, "2h"),
            start_key("ui-1", "g", &json!({"a": 1}), &labels, "2h"),
            start_key("ui-1", "f", &json!({"a": 2}), &labels, "2h"),
            start_key("ui-1", "f", &json!({"a": 1}), &Default::default(), "2h"),
            start_key("ui-1", "f", &json!({"a": 1}), &labels, "3h"),
        ] {
            assert_ne!(asked, other);
        }
        // Within the grid's bound on a key, with the page's key as long as any page makes.
        let page_key = format!("ui-{}", uuid::Uuid::new_v4());
        let longest = start_key(&page_key, "f", &json!(null), &Default::default(), "");
        assert!(longest.len() <= flowgrid_proto::IDEMPOTENCY_KEY_BYTES_MAX, "{longest}");
    }

    #[test]
    fn a_forms_target_leads_back_to_the_page_of_the_form() {
        assert_eq!(form_page("/runs/r1/cancel").as_deref(), Some("/runs/r1"));
        assert_eq!(form_page("/flows/f/pause").as_deref(), Some("/flows/f"));
        assert_eq!(form_page("/flows").as_deref(), Some("/deploy"));
        for path in ["/runs", "/runs/r1", "/runs//cancel", "/runs/r1/", "/runs/r1/cancel/x", "/api/runs/x", "/"] {
            assert_eq!(form_page(path), None, "{path}");
        }
    }

    #[test]
    fn a_host_that_is_not_plain_ascii_is_refused_and_a_missing_one_is_not() {
        let policy = HostPolicy::new("127.0.0.1:8480".parse().unwrap(), &[]).unwrap();
        assert!(policy.allows_header(None));
        assert!(policy.allows_header(Some(&HeaderValue::from_static("localhost:8480"))));
        for host in [&b"local\xe9host"[..], b"\xff", b"127.0.0.1\x80"] {
            let host = HeaderValue::from_bytes(host).unwrap();
            assert!(!policy.allows_header(Some(&host)), "{host:?}");
        }
    }

    #[test]
    fn a_final_failure_of_the_grid_is_a_500_and_one_worth_retrying_a_503() {
        let api = |code| Error::Api(ApiError::new(code, "x"));
        assert_eq!(status_of(&api(ErrorCode::Internal)), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status_of(&api(ErrorCode::Unavailable)), StatusCode::SERVICE_UNAVAILABLE);
        let unreadable = flowgrid_proto::decode::<u32>(flowgrid_proto::Encoding::Json, b"{").unwrap_err();
        assert_eq!(status_of(&Error::Proto(unreadable)), StatusCode::INTERNAL_SERVER_ERROR);
        let timeout = Error::Timeout { what: "run.get".into(), after: std::time::Duration::from_secs(1) };
        assert_eq!(status_of(&timeout), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn only_loopback_names_address_a_ui_on_a_loopback_address() {
        let listen: std::net::SocketAddr = "127.0.0.1:8480".parse().unwrap();
        let policy = HostPolicy::new(listen, &[" UI.example.com ".to_owned()]).unwrap();
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST",
            "ui.localhost:80",
            "[::1]:8080",
            "[::1]",
            "127.1.2.3:9",
            "UI.example.com:8480",
            "ui.example.com.",
            "localhost.:8480",
            // No `Host` (a health check over HTTP/1.0): no browser's page.
            "",
        ] {
            assert!(policy.allows(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "127.0.0.1.evil:80",
            "ui.example.com.evil:80",
        ] {
            assert!(!policy.allows(host), "{host}");
        }
    }

    /// A UI on 0.0.0.0 answers for any IP address (a name cannot be rebound to one) and
    /// its allowed names, never for another name.
    #[test]
    fn a_ui_on_every_address_answers_for_ip_addresses_and_allowed_names_only() {
        let listen: std::net::SocketAddr = "0.0.0.0:8480".parse().unwrap();
        let policy = HostPolicy::new(listen, &["flowgrid.corp".to_owned()]).unwrap();
        for host in [
            "10.0.0.1:8480",
            "192.168.1.5",
            "[fe80::1]:8480",
            "[fe80::1%25eth0]:8480",
            "localhost:8480",
            "flowgrid.corp",
        ] {
            assert!(policy.allows(host), "{host}");
        }
        for host in ["rebind.evil:8480", "evil.example", "flowgrid.corp.evil"] {
            assert!(!policy.allows(host), "{host}");
        }
        // A name given with a port is taken without it; one with a scheme or a path would
        // never match: refused at the start.
        let with_port = HostPolicy::new(listen, &["Flowgrid.corp:8480".to_owned()]).unwrap();
        assert!(with_port.allows("flowgrid.corp:8480"));
        for given in ["http://flowgrid.corp", "flowgrid.corp/ui", ""] {
            let refused = HostPolicy::new(listen, &[given.to_owned()]).err().map(|error| error.to_string());
            assert!(refused.is_some_and(|why| why.contains("--allowed-host")), "{given}");
        }
    }
}
