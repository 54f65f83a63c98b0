//! Request, reply and task messages.

use std::sync::Arc;

use flowgrid_engine::{RunStatus, TaskError};
use flowgrid_model::{AttemptId, FlowDefinition, Issue, Labels, Millis, ParentRef, RunId, Schedule, Trigger};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every API reply: `{"ok": <reply>}` or `{"error": <ApiError>}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(ApiError),
}

impl<T> From<Result<T, ApiError>> for Reply<T> {
    fn from(outcome: Result<T, ApiError>) -> Self {
        match outcome {
            Ok(value) => Reply::Ok(value),
            Err(error) => Reply::Error(error),
        }
    }
}

impl<T> Reply<T> {
    pub fn into_result(self) -> Result<T, ApiError> {
        match self {
            Reply::Ok(value) => Ok(value),
            Reply::Error(error) => Err(error),
        }
    }
}

/// Why a request was refused. `retryable` says whether the same request may succeed later
/// (overload, a shard moving); otherwise the request itself must change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Located problems: of a definition (`invalid_definition`), or of a run's input that
    /// does not match its flow's `input_schema` (`invalid_request`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issues: Vec<Issue>,
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a field is invalid.
    InvalidRequest,
    /// The flow definition was refused; see `issues`.
    InvalidDefinition,
    /// No such flow, version or run.
    NotFound,
    /// A payload is over its size limit.
    PayloadTooLarge,
    /// The grid is at a bound (queue, in-flight tasks): retry later.
    Overloaded,
    /// The shard is moving or not served yet: retry shortly.
    Unavailable,
    /// The request conflicts with the current state (e.g. cancelling an ended run).
    Conflict,
    /// A bug or a store failure.
    Internal,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).ok().and_then(|value| value.as_str().map(str::to_owned));
        f.write_str(text.as_deref().unwrap_or("error"))
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let retryable = matches!(code, ErrorCode::Overloaded | ErrorCode::Unavailable);
        ApiError { code, message: message.into(), issues: Vec::new(), retryable }
    }

    /// Whether the grid answered the request for good: it refused the request itself (a
    /// bad input, no such flow, a conflict), or failed on it in a way the same request would
    /// meet again (`internal`). Not final: a retryable error, and an `unavailable` that is
    /// not retryable (a request whose shard or owner did not answer: it may have been
    /// applied), after which a request that is safe to repeat may be sent again.
    pub fn is_final(&self) -> bool {
        !self.retryable && self.code != ErrorCode::Unavailable
    }
}

/// Room kept under a server's `max_payload` for a message's subject and headers.
const MESSAGE_OVERHEAD_BYTES: usize = 1024;
/// A message up to this size fits every server: no need to look at its bound.
const FITS_ANY_SERVER_BYTES: usize = 64 * 1024;

/// The smallest `max_payload` that carries a task or a result whose input or output is
/// `payload_bytes_max` bytes: room for its subject and headers, and for the message's own
/// fields (attempt, pool, reply subject, ...).
pub fn max_payload_needed(payload_bytes_max: usize) -> usize {
    payload_bytes_max + 2 * MESSAGE_OVERHEAD_BYTES
}

/// Refuses a message (`what`: "the request", "the reply") of `bytes` that the NATS server
/// would refuse, with a `payload_too_large` that names the server's bound (read only for
/// large messages) and how to raise it.
pub fn check_fits_server(what: &str, bytes: usize, max_payload: impl FnOnce() -> usize) -> Result<(), ApiError> {
    if bytes <= FITS_ANY_SERVER_BYTES {
        return Ok(());
    }
    let max_payload = max_payload();
    if bytes + MESSAGE_OVERHEAD_BYTES <= max_payload {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "{what} is {bytes} bytes, over the {} bytes a message may carry on this NATS server (its `max_payload` \
             of {max_payload} less {MESSAGE_OVERHEAD_BYTES} for the subject and headers): raise `max_payload` in \
             nats-server's configuration (deploy/nats-server.conf sets 8MB)",
            max_payload.saturating_sub(MESSAGE_OVERHEAD_BYTES)
        ),
    ))
}

/// `<prefix>.api.flow.deploy`: deploy a definition (YAML or JSON text) as a new version.
/// Deploying a definition identical to the latest version returns that version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployFlow {
    pub definition: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowDeployed {
    pub name: String,
    pub version: u32,
    /// `false` when the definition equals the latest version, which was returned instead.
    pub created: bool,
}

/// `<prefix>.api.flow.list`: the deployed flows in name order, a page at a time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFlows {
    /// Page size, 1 to 1,000 (default 1,000); a page also ends before 256 KiB of flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowList {
    pub flows: Vec<FlowSummary>,
    /// Present when more flows follow: pass it as `cursor` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowSummary {
    pub name: String,
    pub latest_version: u32,
    pub deployed_ms: Millis,
    pub steps: u32,
    /// The latest version's description; past 1,024 characters cut, ending in `…` (`flow
    /// get` gives the whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The latest version's schedule, if it has one: the grid starts its runs on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The latest version's trigger, if it has one: the grid starts a run per message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// Set while the flow's schedule and trigger start no runs (`flow.pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<FlowPause>,
}

/// Since when and why a flow's automatic starts are paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FlowPause {
    pub since_ms: Millis,
    pub reason: String,
}

/// `<prefix>.api.flow.pause` and `<prefix>.api.flow.resume`: stops the runs a flow's
/// schedule and trigger start, or lets them start again. Runs started through the API are
/// not affected, nor are running runs (`run.pause` pauses those).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseFlow {
    pub name: String,
    /// Why, shown with the flow.
    #[serde(default)]
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowPaused {
    pub name: String,
    /// The flow's automatic starts are paused after the request.
    pub paused: bool,
    /// The request changed the flow: `false` for a pause of a paused flow or a resume of
    /// one that is not paused (repeating either is safe).
    pub applied: bool,
}

/// `<prefix>.api.flow.get`: one version (the latest when `version` is absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetFlow {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowInfo {
    pub name: String,
    pub version: u32,
    pub deployed_ms: Millis,
    pub definition: FlowDefinition,
    /// Set while the flow's schedule and trigger start no runs (`flow.pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<FlowPause>,
}

/// `<prefix>.api.run.start` (request/reply) or `<prefix>.submit` (durable, no reply).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    pub flow: String,
    /// Version to run; the latest when absent. The run keeps this version to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default)]
    pub input: Value,
    /// Starting again with the same flow and key returns the same run instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `key: value` pairs to find the run by (`ListRuns::labels`): at most 16, keys of 1 to
    /// 64 characters of `A-Z a-z 0-9 _ - . /`, values of at most 256 bytes, each key once.
    #[serde(
        default,
        skip_serializing_if = "Labels::is_empty",
        deserialize_with = "flowgrid_model::labels::deserialize_once"
    )]
    pub labels: Labels,
    /// Start no step before this time (Unix ms, at most 366 days ahead): the run exists at
    /// once (listed, read, cancelled) and waits, `delayed`, until then; its timeout counts
    /// from then. A time already past starts it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<Millis>,
}

/// The longest idempotency key a start may carry (bytes): it is hashed, but it is also
/// logged and echoed.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Whether `key` is of the form of the idempotency keys the grid gives starts of its own: a
/// child run of a subflow step (`subflow/<parent>/<step>...`) or a durable submit without a
/// key (`submit-<stream created>-<sequence>`, and `submit-<sequence>` of versions before
/// it, each number in digits). A caller's start with one could take the place of such a
/// start, which would then start nothing, so they are refused.
pub fn is_grid_key(key: &str) -> bool {
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    let submit = key.strip_prefix("submit-").is_some_and(|numbers| match numbers.split_once('-') {
        Some((created, sequence)) => digits(created) && digits(sequence),
        None => digits(numbers),
    });
    key.starts_with("subflow/") || submit
}

impl StartRun {
    /// What is wrong with the start on its face, without asking the grid (its labels, its
    /// idempotency key, its start time against `now_ms`): the coordinator refuses such a
    /// start, and a client checks a durable submit with it before it is stored, since no
    /// one would hear the coordinator's refusal of it.
    pub fn refusal(&self, now_ms: Millis) -> Option<ApiError> {
        let invalid = |message: String| Some(ApiError::new(ErrorCode::InvalidRequest, message));
        if let Err(message) = flowgrid_model::check_labels(&self.labels) {
            return invalid(message);
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
                return invalid(format!(
                    "idempotency_key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes, it is {}",
                    key.len()
                ));
            }
            if is_grid_key(key) {
                return invalid(format!(
                    "idempotency_key {key:?} has the form the grid keeps for starts of its own (`subflow/...` for \
                     child runs of subflow steps, `submit-<number>-<number>` for durable submits without a key): use \
                     a key of your own"
                ));
            }
        }
        match self.start_at_ms {
            Some(start_at) if start_at > now_ms.saturating_add(flowgrid_model::limits::DURATION_MS_MAX) => {
                invalid(format!(
                    "start_at_ms is more than 366 days ahead ({}); start the run later instead",
                    flowgrid_model::utc_time(start_at, false)
                ))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunStarted {
    pub run_id: RunId,
    pub flow: String,
    pub version: u32,
    /// `false` when the idempotency key named a run that already existed.
    pub created: bool,
}

impl StartRun {
    /// The start of the run a flow's `schedule` gives its slot at `slot_ms`: the
    /// schedule's input and labels, and the idempotency key of the slot, so the scheduler
    /// and a backfill start the same run for a slot, once.
    pub fn for_schedule_slot(flow: String, schedule: &Schedule, slot_ms: Millis) -> StartRun {
        StartRun {
            flow,
            version: None,
            input: schedule.input.clone(),
            idempotency_key: Some(flowgrid_model::schedule::Timetable::run_key(slot_ms)),
            labels: schedule.labels.clone(),
            start_at_ms: None,
        }
    }
}

/// `<prefix>.api.run.start_many`: many starts in one request, each applied as a
/// `run.start` of its own. A service that starts runs at a high rate sends far fewer
/// messages this way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRuns {
    /// 1 to 1,000 starts.
    // The bound is `START_MANY_RUNS_MAX`.
    pub runs: Vec<StartRun>,
}

/// Most starts in one `run.start_many` request: one API request slot admits this much
/// work into the shards' queues at once, and its reply stays far below NATS's default
/// 1 MiB payload limit.
pub const START_MANY_RUNS_MAX: usize = 1_000;

/// The outcome of each start of a `run.start_many`, in request order: one start can be
/// refused (an unknown flow, overload) while the others start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunsStarted {
    pub results: Vec<Reply<RunStarted>>,
}

/// `<prefix>.api.run.get`: the run's status, steps, output and error (reply: `RunView`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetRun {
    pub run_id: RunId,
    /// Leave the run's input and every output (the run's, each step's, and progress
    /// reports) out: for a run whose whole view is over the NATS server's `max_payload`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_data: bool,
}

/// `<prefix>.api.run.history`: what was recorded for a run, oldest first, a page at a time
/// (reply: `RunHistory`): its start, then every event it accepted (results, timers,
/// signals, cancels, ...), each with when it was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetRunHistory {
    pub run_id: RunId,
    /// Only records after this one (the `next` of the page before). Default: from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// At most this many records (default and most: 1,000; a page also ends before it
    /// would pass 512 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A page of a run's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunHistory {
    pub run_id: RunId,
    pub records: Vec<HistoryRecord>,
    /// More records follow: ask again with this as `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// One record of a run's history: record 0 is its start (`started`), every later one an
/// event it accepted (`event`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryRecord {
    /// Its place in the history, from 0.
    pub seq: u64,
    /// When the shard took it (Unix ms).
    pub at_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<HistoryStart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<flowgrid_engine::Event>,
}

/// How a run started: its flow version, input and what it was started with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryStart {
    pub flow: String,
    pub version: u32,
    pub input: Value,
    /// The subflow step that started it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// It started queued behind its flow's concurrency limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    /// It was started with this later start time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<Millis>,
}

/// `<prefix>.api.run.list`: newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListRuns {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    /// Only the child runs that subflow steps of this run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RunStatus>,
    /// Only the runs started with all of these labels.
    #[serde(
        default,
        skip_serializing_if = "Labels::is_empty",
        deserialize_with = "flowgrid_model::labels::deserialize_once"
    )]
    pub labels: Labels,
    /// Only the runs started at or after this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<Millis>,
    /// Only the runs started before this time (Unix ms); after `since_ms` when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<Millis>,
    /// Page size, 1 to 1,000 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunList {
    pub runs: Vec<RunSummary>,
    /// Present when more runs match: pass it as `cursor` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunSummary {
    pub run_id: RunId,
    pub flow: String,
    pub version: u32,
    pub status: RunStatus,
    pub created_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<Millis>,
    /// The run whose subflow step started this one, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<RunId>,
    /// The run is paused (`run.pause`): it starts no step until it is resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The run waits for its flow's concurrency limit to admit it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    /// The run waits for the start time it was started with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delayed: bool,
    /// The labels it was started with.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// `<prefix>.api.run.cancel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRun {
    pub run_id: RunId,
    #[serde(default)]
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCancelled {
    pub run_id: RunId,
    /// The run's status after the request (`cancelled`, or the status it had already ended in).
    pub status: RunStatus,
    /// Whether this request cancelled the run (`false`: it had ended, cancelled or not,
    /// before). A coordinator of an earlier version does not say; read as `true`.
    #[serde(default = "applied_unless_said")]
    pub applied: bool,
}

fn applied_unless_said() -> bool {
    true
}

/// `<prefix>.api.run.redrive`: runs a run that ended again, from the steps that did not
/// succeed (steps that succeeded keep their outputs), and from the steps in `from` with
/// every step after them, even if they succeeded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveRun {
    pub run_id: RunId,
    /// Why, for the run's history and logs.
    #[serde(default)]
    pub reason: String,
    /// Steps (ids) to run again from, with every step after them; a succeeded run needs at
    /// least one. Empty: only the steps that did not succeed, of a run that did not succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunRedriven {
    pub run_id: RunId,
    /// The run's status after the request: `running`, or the status it ended in again at
    /// once (a run whose flow fails the same way without any task).
    pub status: RunStatus,
    /// Redrives of the run so far, this one included.
    pub times: u32,
}

/// `<prefix>.api.run.pause` and `<prefix>.api.run.resume`: pauses a running run (it starts
/// no step until it is resumed; what it started goes on) or resumes a paused one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRun {
    pub run_id: RunId,
    /// Why, for the run's history and view.
    #[serde(default)]
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunPaused {
    pub run_id: RunId,
    /// The run's status after the request.
    pub status: RunStatus,
    /// The run is paused after the request.
    pub paused: bool,
    /// The request changed the run: `false` for a pause of a paused run, a resume of a run
    /// that is not paused, and a run that ended (repeating either request is safe).
    pub applied: bool,
}

/// `<prefix>.api.run.signal`: a signal for signal step `step` of a run. The step takes the
/// first signal sent while it waits; `data` becomes its output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRun {
    pub run_id: RunId,
    pub step: String,
    #[serde(default)]
    pub data: Value,
    /// The sender's id for this signal (at most 128 bytes), the same when it sends it again
    /// after a lost answer: a step that took a signal with this id answers `applied: true`
    /// again. The SDK and the CLI make one per signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunSignalled {
    pub run_id: RunId,
    pub step: String,
    /// `true`: this signal is the step's output and the run goes on. `false`: the step was
    /// over already (it took an earlier signal, timed out, or the run ended); nothing changed.
    pub applied: bool,
    /// The run's status after the request.
    pub status: RunStatus,
}

/// `<prefix>.api.run.start_child`: the start of the child run of a subflow step, sent by
/// the coordinator of the parent run. It is a `run.start` whose idempotency key follows
/// from the parent ([`ParentRef::child_key`]): sending it again starts nothing new. The
/// reply is a `RunStarted`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartChildRun {
    pub flow: String,
    /// Version to run; the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    // Shared with the parent's run state, which sends it without a copy.
    #[serde(default)]
    pub input: Arc<Value>,
    /// The subflow step the child reports its end to.
    pub parent: ParentRef,
    /// The parent's labels, which the child carries too.
    #[serde(
        default,
        skip_serializing_if = "Labels::is_empty",
        deserialize_with = "flowgrid_model::labels::deserialize_once"
    )]
    pub labels: Labels,
}

/// `<prefix>.api.run.child_ended`: a child run ended (or could not be started); sent by
/// the coordinator of the child until the parent's coordinator has taken it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChildRunEnded {
    /// The parent run and its subflow step (and the item, for a step with `items`).
    pub parent: RunId,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub child: RunId,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// The child could not be started at all: its start was refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChildEndTaken {
    /// `true`: the step took this end. `false`: it had taken it already, or the parent
    /// ended; nothing changed.
    pub applied: bool,
}

/// `limit.list`: the concurrency limits in use (a run holds a slot or waits, or a start
/// rate is refilling), of one flow or of all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LimitList {
    /// By flow, then key; at most [`LimitList::LIMITS_MAX`]: the busiest, when more are in use.
    pub limits: Vec<LimitSummary>,
    /// Limits in use left out of `limits`.
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub more: u32,
}

impl LimitList {
    /// Limits one reply lists at most: a reply of a grid with a limit per customer stays far
    /// below NATS's default 1 MiB payload limit.
    pub const LIMITS_MAX: usize = 1_000;
}

/// One concurrency limit in use: one flow and one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LimitSummary {
    pub flow: String,
    /// The runs' concurrency key (`""` for a limit without one).
    pub key: String,
    /// Runs at once, as the newest flow version that asked gives it; 0: no bound.
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub max: u32,
    /// Runs started per period, as the newest flow version that asked gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<flowgrid_model::StartRate>,
    /// What a run past the limit does, as the newest flow version that asked gives it.
    #[serde(default, skip_serializing_if = "flowgrid_model::WhenFull::is_queue")]
    pub when_full: flowgrid_model::WhenFull,
    /// Runs admitted and not ended.
    pub going: u32,
    /// Runs waiting for their turn.
    pub queued: u32,
    /// When the start rate lets the first queued run go (Unix ms), if it holds it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start_ms: Option<u64>,
}

/// A message about one run's place under its flow's concurrency limit, sent between
/// coordinators until taken:
/// - `<prefix>.api.gate.acquire`: a run that started (or was redriven) queued asks for a
///   slot; the limit's shard admits it when it has room, in the order asked;
/// - `<prefix>.api.gate.release`: a run ended and gives its slot (or its place in the
///   queue) back;
/// - `<prefix>.api.run.admit`: the limit admits the run; its shard starts the steps it held
///   (a run that ended or went again meanwhile gives the slot back instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GateMessage {
    /// The limit: the flow and the run's concurrency key (`""` without one).
    pub flow: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    pub run_id: RunId,
    /// Which start of the run it is about: 0 for its start, `n` after its `n`th redrive.
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub round: u32,
    /// With an acquire: the limit's `max` in the run's flow version (0: no bound on runs at
    /// once).
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub max: u32,
    /// With an acquire: the limit's start rate in the run's flow version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<flowgrid_model::StartRate>,
    /// With an acquire: what a run past the limit does, in the run's flow version.
    #[serde(default, skip_serializing_if = "flowgrid_model::WhenFull::is_queue")]
    pub when_full: flowgrid_model::WhenFull,
    /// With an acquire: the run's flow version, whose `max`, `rate` and `when_full` these
    /// are. The limit takes them only from a version at least as new as the one whose
    /// bounds it holds: a run of an older version (redriven, delayed past a deploy, a child
    /// run pinned to it) asks under the newest version's bounds. 0: from a coordinator
    /// that predates this field (older than any version).
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub version: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GateTaken {
    /// `false`: a repeat, or nothing to change.
    pub applied: bool,
}

/// Published as JSON on `<prefix>.runs.ended.<flow>` after the commit that ended a run of
/// a flow with `publish_ended: true`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunEnded {
    pub run_id: RunId,
    pub flow: String,
    pub version: u32,
    pub status: RunStatus,
    pub created_ms: Millis,
    pub ended_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// How often the run was redriven before this end: each end of a redriven run is
    /// announced once more.
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub redriven: u32,
}

/// A task, as published to `<prefix>.tasks.<pool>`. Everything a worker needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskMessage {
    /// Echo this back in the result, unchanged.
    pub attempt: AttemptId,
    pub pool: Arc<str>,
    /// Task name: what the worker should do.
    pub task: Arc<str>,
    /// What the task works on: the step's evaluated `input`.
    // Shared with the coordinator's run state, which publishes it without a copy.
    pub input: Arc<Value>,
    /// The coordinator times the attempt out at this time (Unix ms); work past it is wasted.
    pub deadline_ms: Millis,
    /// Subject to send the `TaskResult` to, as a NATS request.
    pub reply_to: String,
    /// The last progress a worker reported for this step (or map item), by an earlier
    /// attempt that then failed, or by this one before it was delivered again: where this
    /// one may resume. Absent when none was reported, or when it and the input together
    /// would be over a payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Arc<Value>>,
}

/// Published (JSON, core NATS, not stored) on `<prefix>.cancels.<pool>` after a commit that
/// closed attempts of the pool's tasks without their results: their run was cancelled,
/// failed or timed out, or their step was cancelled with it. A worker running one of them
/// may stop: its result would be ignored. Advisory: a worker that misses it finishes the
/// task, and its result is answered `applied: false`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TasksCancelled {
    pub attempts: Vec<AttemptId>,
}

/// A worker's result for one attempt: exactly one of `output` and `error`; or, with
/// `progress` instead, a report of how far the attempt got while it goes on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskResult {
    pub attempt: AttemptId,
    /// Any JSON, `null` included: a task may have nothing to return. A `null` beside an
    /// `error` or a `progress` is no output (a worker that writes every field).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    #[schemars(with = "Option<Value>")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// How far the attempt got (any JSON the worker chooses): shown with its step, and
    /// sent with the step's next attempt if this one fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
}

impl TaskResult {
    /// The output, unless it is a `null` beside an error or a progress report.
    pub fn take_output(&mut self) -> Option<Value> {
        let beside_other = self.error.is_some() || self.progress.is_some();
        self.output.take().filter(|output| !(output.is_null() && beside_other))
    }
}

/// Reads a field that is there as `Some`, also when it is `null`: a plain `Option` reads
/// `null` as no field at all, and a task whose output is `null` would have no result.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// A piece of an attempt's live output (the tokens of a model's answer as they come, a
/// log line of a long job): published by the worker to `P.live.<run_id>.<step>` while the
/// attempt runs, kept for an hour in the live-output stream, read by whoever tails the run.
/// Best effort: the attempt's result is what counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveOutput {
    pub attempt: AttemptId,
    /// 1 for the attempt's first piece, then 2, 3, ...: a reader sees a gap if one was lost.
    pub seq: u64,
    /// Any JSON: a text is written out as it is by `flowgrid run tail`.
    pub data: Value,
}

impl LiveOutput {
    /// The most bytes one piece may take, encoded: a piece is a few tokens or a log line,
    /// and a reader gets each as one event; a large output belongs in the task's result.
    pub const BYTES_MAX: usize = 64 * 1024;

    /// The piece as it is written out: a text as it is (the pieces of one text make it
    /// up), any other value as JSON on a line of its own.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match &self.data {
            Value::String(text) => std::borrow::Cow::Borrowed(text),
            other => std::borrow::Cow::Owned(format!("{other}\n")),
        }
    }
}

/// Reply to a `TaskResult`: once received, the result is durable and the worker may ack
/// the task message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResultAck {
    /// `false` when the result was for an attempt that is no longer open (a duplicate,
    /// or too late): it was ignored, and the worker should still ack the task.
    pub applied: bool,
}

#[cfg(test)]
mod tests {
    use super::{is_grid_key, ApiError, ErrorCode};

    #[test]
    fn only_what_no_retry_can_change_is_final() {
        let codes = [ErrorCode::NotFound, ErrorCode::Conflict, ErrorCode::PayloadTooLarge, ErrorCode::InvalidRequest];
        for code in codes.into_iter().chain([ErrorCode::Internal]) {
            assert!(ApiError::new(code, "x").is_final(), "{code}");
        }
        for code in [ErrorCode::Unavailable, ErrorCode::Overloaded] {
            assert!(!ApiError::new(code, "x").is_final(), "{code}");
        }
        // A forwarded request whose owner did not answer: it may have been applied.
        let maybe_applied = ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "x") };
        assert!(!maybe_applied.is_final());
    }

    #[test]
    fn only_keys_of_the_grid_s_own_forms_are_its_own() {
        for key in ["subflow/r1/step", "subflow/r1/step/3/r2", "submit-7", "submit-123456", "submit-1700000000-7"] {
            assert!(is_grid_key(key), "{key}");
        }
        for key in [
            "submit-",
            "submit-order-7",
            "submit-7a",
            "submit-7-",
            "submit-7-1-2",
            "order-7",
            "subflow",
            "my-subflow/x",
        ] {
            assert!(!is_grid_key(key), "{key}");
        }
    }
}
