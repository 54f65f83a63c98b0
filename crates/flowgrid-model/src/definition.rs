//! Flow definitions as authors write them (YAML or JSON, one model).
//!
//! Every struct denies unknown fields so that a typo (`retyr:`) is an error at deploy
//! time, not a silently ignored setting. Expressions are kept as source text here; the
//! [`crate::plan`] compiles them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named DAG of steps. Deploying it creates an immutable version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowDefinition {
    /// Flow name: letters, digits, `-` and `_`, at most 128 characters.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema every run's input must match: a start whose input does not is
    /// refused with each problem located (`input/...`), and nothing is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// At most this many runs of the flow go at once (of each key): the others wait,
    /// queued, in the order they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Run-level deadline: a run still going after this long ends `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Expression for the run's output. Without it the output is an object holding the
    /// output of every step that no other step depends on, by step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Starts runs of the flow on a timetable (the latest version's schedule is the one
    /// that runs; deploy a version without one to stop it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Starts a run of the flow for every message of a JetStream stream, with the message
    /// (JSON) as its input, exactly once per message (the latest version's trigger is the
    /// one that runs; deploy a version without one to stop it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// Publish a message on `<prefix>.runs.ended.<flow>` when a run of the flow ends (its
    /// status, output or error), kept in the grid's run-ends stream: for services that
    /// react to runs ending instead of polling them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_ended: bool,
    /// A flow the grid starts when a run of this flow fails: a compensation, a cleanup, an
    /// alert. One run per failure, started exactly once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    pub steps: Vec<Step>,
}

/// The failure handler of a flow: a run of `flow`, started when a run of this flow ends in
/// one of `statuses`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnFailure {
    /// The flow to start (its latest version when the failure happens).
    pub flow: String,
    /// Expression for the handler run's input. It reads the failure as `result`
    /// (`run_id`, `flow`, `version`, `status`, `error` and `input` of the run that
    /// failed), the run's `input` and every step as `steps`. Default: `result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Which ends start the handler. Default: `failed` and `timed_out`.
    #[serde(default = "FailureEnd::defaults")]
    pub statuses: Vec<FailureEnd>,
}

/// An end of a run that may start its flow's failure handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureEnd {
    Failed,
    TimedOut,
    Cancelled,
}

impl FailureEnd {
    fn defaults() -> Vec<FailureEnd> {
        vec![FailureEnd::Failed, FailureEnd::TimedOut]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureEnd::Failed => "failed",
            FailureEnd::TimedOut => "timed_out",
            FailureEnd::Cancelled => "cancelled",
        }
    }
}

/// How many runs of a flow may go at once (`max`), and how fast they may start (`rate`):
/// in all, or for each value `key` gives (e.g. per customer). Give `max`, `rate` or both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Runs that go at once, 1 to 100,000; a run started past it waits, queued, until one
    /// of them ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Runs that start per period; a run started faster waits, queued, for its turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<StartRate>,
    /// An expression over the run's `input` (e.g. `input.customer`): the limit counts the
    /// runs of each value apart. One limit for the whole flow when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What a run started past the limit does: wait its turn (`queue`, the default), be
    /// cancelled at once (`cancel_new`), or take the place of the oldest run of its key,
    /// which is cancelled (`cancel_oldest`, with `max`).
    #[serde(default, skip_serializing_if = "WhenFull::is_queue")]
    pub when_full: WhenFull,
}

/// What a run started past its flow's concurrency limit does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// It waits, queued, and goes in the order it started.
    #[default]
    Queue,
    /// It is cancelled at once: the runs going keep their places (a job that must not
    /// overlap itself skips a turn).
    CancelNew,
    /// The oldest run of its key is cancelled and the new one takes its place once it
    /// ended (the latest request wins).
    CancelOldest,
}

impl WhenFull {
    pub fn is_queue(&self) -> bool {
        *self == WhenFull::Queue
    }

    /// As definitions write it.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Queue => "queue",
            WhenFull::CancelNew => "cancel_new",
            WhenFull::CancelOldest => "cancel_oldest",
        }
    }
}

/// At most `runs` runs start per `per_ms` milliseconds, spread evenly (one each
/// `per_ms / runs`), with a burst of up to `runs` after a quiet period (a token bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRate {
    /// 1 to 100,000.
    pub runs: u32,
    /// 1 ms to 366 days.
    pub per_ms: u64,
}

/// When the grid starts runs of a flow by itself: every `every_ms`, or at the minutes a
/// `cron` expression matches (UTC). Give exactly one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// A run at every multiple of this many milliseconds since the Unix epoch (1,000 to
    /// 366 days): 60000 starts one at the start of every minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// A cron expression of 5 fields, in UTC unless `timezone` names another zone: minute,
    /// hour, day of month, month, day of week (`0 */6 * * *`: every six hours on the hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// With `cron`: the IANA time zone whose wall clock the expression reads
    /// (`Europe/Berlin`), summer time included. Default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The input of every run it starts.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub input: serde_json::Value,
    /// The labels of every run it starts (`run list --label`).
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub labels: crate::Labels,
}

/// Where the events that start runs of a flow come from: the messages of a JetStream
/// stream (of the operator's own), from the first one published after the trigger was
/// first deployed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The stream's name; it must exist when the flow is deployed.
    pub stream: String,
    /// Only the stream's messages on this subject (wildcards `*` and `>` allowed); every
    /// message of the stream when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// An expression giving each run's input from its message, which it reads as
    /// `input.message` (the payload, JSON), `input.subject` and `input.sequence` (in the
    /// stream). Default: the message's payload as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The labels of every run it starts (`run list --label`).
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub labels: crate::Labels,
}

/// One step. `kind` selects the variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Task(TaskStep),
    Choice(ChoiceStep),
    Map(MapStep),
    Transform(TransformStep),
    Succeed(SucceedStep),
    Fail(FailStep),
    Wait(WaitStep),
    Signal(SignalStep),
    Subflow(SubflowStep),
}

/// Work for a worker pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskStep {
    pub id: String,
    /// Steps that must finish before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Worker pool that runs the task (`gpu-llm`, `cpu-media`, ...).
    pub pool: String,
    /// Task name the worker dispatches on.
    pub task: String,
    /// Expression for the task input. Default: the run input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Expression applied to the worker's result (as `result`) to give the step output.
    /// Default: the worker's result as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Start-to-close timeout of one attempt; a timed-out attempt fails with code `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long the step may take in all, over every attempt and the waits between them:
    /// past it, the attempt out is stopped and the step fails with code `timeout` (no more
    /// retries; a catch may take it). Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_timeout_ms: Option<u64>,
    /// Higher starts first among a pool's waiting tasks (0-9, default 5): each priority is
    /// a lane of the pool that workers drain before the lower ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Reuse a stored worker result for the same key instead of asking a worker again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<TaskCache>,
    /// Where a failure goes once retries are exhausted, instead of failing the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch: Vec<Catch>,
}

/// A task's results shared across runs: a worker's successful result is stored under the
/// task's pool, name and key, and an attempt with the same pool, name and key takes it
/// instead of going to a worker, for `ttl_ms` after it was stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCache {
    /// Expression over the task's input (read as `input`) giving what identifies the
    /// result, for example `input.url`. Default: the whole task input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How long a stored result is reused, from when it was stored (at most 30 days).
    pub ttl_ms: u64,
}

/// Retry policy of a task (per attempt of a task, or per item of a map).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff_ms: u64,
    /// Each further delay is the previous one times this.
    pub backoff_multiplier: f64,
    /// Upper bound of one delay.
    pub max_backoff_ms: u64,
    /// Random spread of each delay, as a fraction (0.2 = up to 20% shorter).
    pub jitter: f64,
    /// Error codes that are retried; `*` retries every code. A worker may also mark an
    /// error non-retryable, which is never retried.
    pub retry_on: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 200,
            backoff_multiplier: 2.0,
            max_backoff_ms: 30_000,
            jitter: 0.2,
            retry_on: vec!["*".to_owned()],
        }
    }
}

/// Routes a failure whose code matches `errors` to step `next`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Catch {
    /// Error codes this catch handles; `*` (the default) handles every code.
    #[serde(default = "all_errors")]
    pub errors: Vec<String>,
    /// The fallback step. It runs only when this catch fires and can read the error as
    /// `steps.<failed step>.error`.
    pub next: String,
}

fn all_errors() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Picks one branch: the first rule whose `when` is true, else `default`. The steps of the
/// branches not taken are skipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChoiceStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    pub choices: Vec<ChoiceRule>,
    /// Branch taken when no rule matches. Without it, no match fails the run with
    /// `no_choice_matched`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChoiceRule {
    /// Boolean expression.
    pub when: String,
    /// Step that runs when this rule is taken.
    pub next: String,
}

/// Dynamic fan-out: one task per item of a list, results merged in item order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Expression giving the list to fan out over.
    pub items: String,
    pub pool: String,
    pub task: String,
    /// Expression for each item's task input; `item` and `index` are in scope.
    /// Default: the item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Expression applied to the merged list of item results (as `result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Items in flight at once. Default and largest: 10,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Items that may fail (after their retries) without failing the step; their place in
    /// the merged output is `null`. Default 0.
    #[serde(default)]
    pub tolerated_failures: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long the whole map may take, over all its items and their attempts: past it,
    /// the items out are stopped and the step fails with code `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_timeout_ms: Option<u64>,
    /// Priority of each item's task, as a task step's (0-9, default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Reuse stored worker results, item by item (the key reads each item's task input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<TaskCache>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch: Vec<Catch>,
}

/// Computes data inside the engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Expression whose value is the step output.
    pub output: String,
}

/// Ends the run as succeeded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SucceedStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Expression for the run output. Default: the flow's `output`, else as for a run that
    /// ends by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// Ends the run as failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Error code of the run.
    pub error: String,
    /// Expression for the error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Waits inside the engine, on a durable timer: for a fixed time (`duration_ms`) or for
/// as long as an expression says (`duration`). Its output is `{"waited_ms": n}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// How long to wait, in milliseconds. Give this or `duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Expression giving how long to wait, in milliseconds (a number; 0 goes on at once).
    /// Give this, `duration_ms` or `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Expression giving when the wait ends: a time in Unix milliseconds, or an RFC 3339
    /// text (`2026-12-24T09:00:00Z`); a time already past goes on at once. Give this,
    /// `duration_ms` or `duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// Waits for a signal sent to the run from outside (`run.signal`: an approval, a
/// webhook, a job finished elsewhere). The first signal for the step is its output; later
/// ones change nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// How long to wait for the signal; without one the step fails with code `timeout`.
    /// Default: no limit (the flow's `timeout_ms` still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Where a timeout goes instead of failing the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch: Vec<Catch>,
    /// Keep a signal sent before the step starts, and take it when the step starts.
    /// Default: such a signal is refused, so that nothing is decided before the step is
    /// reached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_early: bool,
}

/// Runs another flow as a step and waits for it: the child run's output is the step's
/// output; a child that fails, times out or is cancelled fails the step with its error
/// (which a `catch` may take). Cancelling the parent cancels the child. With `items`,
/// runs one child per item, like a `map` step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubflowStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Expression (a boolean) read when the step would start: `false` skips it, as a step
    /// no edge activated is skipped. Default: the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The flow the child run runs.
    pub flow: String,
    /// Its version; default: the latest when the step starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Expression giving the child run's input (with `item` and `index` when `items` is
    /// set); default: this run's input, or the item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Expression giving a list: one child run per item, the step's output their outputs
    /// in item order (a failed child's place is `null`). Without it, one child run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<String>,
    /// With `items`: child runs going at once. Default and largest: 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// With `items`: children that may fail before the step fails with `map_failed`.
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub tolerated_failures: u32,
    /// How long the step waits for its children; past it, they are cancelled and the
    /// step fails with code `timeout`. Default: no limit (each child flow's own
    /// `timeout_ms` still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Runs the child again, one after the other, until a condition holds: a loop whose
    /// body is the child flow. Not with `items`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<Repeat>,
    /// Where a failed child goes instead of failing the run, by the child's error code
    /// (with `items`: by `map_failed`; with `repeat`: also by `iterations_exhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch: Vec<Catch>,
}

/// The loop of a subflow step: a child run per iteration, each started when the one
/// before it succeeded and `until` was false. The step's `input` reads `iteration` (from
/// 0) and `previous` (the output of the iteration before, `()` in the first); without
/// `input`, the first child gets the run's input and each later one the output of the
/// child before it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Repeat {
    /// Expression read after each child succeeds, with its output as `result` and its
    /// number (from 0) as `iteration`: `true` ends the loop, and the step's output is that
    /// child's output.
    pub until: String,
    /// The most children the loop runs, 1 to 10,000 (default 100). When the last one's
    /// `until` is false too, the step fails with `iterations_exhausted` (a catch may take it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
}

/// The iterations of a loop when its definition gives none.
pub const REPEAT_ITERATIONS_DEFAULT: u32 = 100;
/// The most iterations a loop may ask for: each is a child run, kept like any other.
pub const REPEAT_ITERATIONS_MAX: u32 = 10_000;

impl Step {
    pub fn id(&self) -> &str {
        match self {
            Step::Task(step) => &step.id,
            Step::Choice(step) => &step.id,
            Step::Map(step) => &step.id,
            Step::Transform(step) => &step.id,
            Step::Succeed(step) => &step.id,
            Step::Fail(step) => &step.id,
            Step::Wait(step) => &step.id,
            Step::Signal(step) => &step.id,
            Step::Subflow(step) => &step.id,
        }
    }

    /// The step's `when` condition, if it has one.
    pub fn when(&self) -> Option<&str> {
        let when = match self {
            Step::Task(step) => &step.when,
            Step::Choice(step) => &step.when,
            Step::Map(step) => &step.when,
            Step::Transform(step) => &step.when,
            Step::Succeed(step) => &step.when,
            Step::Fail(step) => &step.when,
            Step::Wait(step) => &step.when,
            Step::Signal(step) => &step.when,
            Step::Subflow(step) => &step.when,
        };
        when.as_deref()
    }

    pub fn after(&self) -> &[String] {
        match self {
            Step::Task(step) => &step.after,
            Step::Choice(step) => &step.after,
            Step::Map(step) => &step.after,
            Step::Transform(step) => &step.after,
            Step::Succeed(step) => &step.after,
            Step::Fail(step) => &step.after,
            Step::Wait(step) => &step.after,
            Step::Signal(step) => &step.after,
            Step::Subflow(step) => &step.after,
        }
    }

    /// The worker pool a task or map step sends its tasks to; `None` for steps that run
    /// inside the engine.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Step::Task(step) => Some(&step.pool),
            Step::Map(step) => Some(&step.pool),
            Step::Choice(_)
            | Step::Transform(_)
            | Step::Succeed(_)
            | Step::Fail(_)
            | Step::Wait(_)
            | Step::Signal(_)
            | Step::Subflow(_) => None,
        }
    }

    /// The kind as written in definitions (`task`, `choice`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Step::Task(_) => "task",
            Step::Choice(_) => "choice",
            Step::Map(_) => "map",
            Step::Transform(_) => "transform",
            Step::Succeed(_) => "succeed",
            Step::Fail(_) => "fail",
            Step::Wait(_) => "wait",
            Step::Signal(_) => "signal",
            Step::Subflow(_) => "subflow",
        }
    }
}
