//! The API client: deploy flows, start, query, list, signal and cancel runs.
//!
//! Every call is a NATS request on `<prefix>.api.<verb>` in MessagePack. A call that is
//! refused as retryable (`overloaded`, `unavailable`) or that nobody answers (no
//! coordinator subscribed, e.g. during a restart) is retried with backoff until the retry
//! budget is spent, so callers ride over a coordinator restart or a moving shard. A call
//! that times out (its coordinator was cut off from NATS, say) is retried the same way
//! when repeating it is safe: reads, deploys, cancels, and starts that all carry an
//! idempotency key. Any other start returns the timeout: the coordinator may have applied it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use flowgrid_engine::{RunView, TaskError};
use flowgrid_model::RunId;
use flowgrid_proto::{
    decode, encode, ApiError, CancelRun, ChildEndTaken, ChildRunEnded, DeployFlow, Encoding, ErrorCode, FlowDeployed,
    FlowInfo, FlowList, FlowPaused, GateMessage, GateTaken, GetFlow, GetRun, GetRunHistory, LimitList, ListFlows,
    ListLimits, ListRuns, LiveOutput, PauseFlow, PauseRun, ProtoError, RedriveRun, Reply, ResultAck, RunCancelled,
    RunHistory, RunList, RunPaused, RunRedriven, RunSignalled, RunStarted, RunsStarted, SignalRun, StartChildRun,
    StartRun, Subjects, TaskResult,
};
use serde_json::Value;

use crate::backoff::Backoff;
use crate::broker::{self, BrokerLimits};
use crate::connect::NatsOptions;
use crate::error::{Error, Result};
use crate::token::TaskToken;

/// How long one request waits for its reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call keeps retrying refusals that are retryable; long enough to ride over a
/// coordinator restart.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(15);
/// First and largest pause between retries of a call.
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(50);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);
/// First and largest pause between two polls of [`Client::wait`].
const WAIT_POLL_FIRST: Duration = Duration::from_millis(20);
const WAIT_POLL_MAX: Duration = Duration::from_millis(500);
/// The shortest a poll of [`Client::wait`] waits for its reply, even when the wait has
/// less time left: a wait of zero still reads the run once.
const WAIT_REQUEST_TIMEOUT_MIN: Duration = Duration::from_millis(200);

/// A handle on one flowgrid grid. Cheap to clone; clones share the NATS connection.
///
/// ```no_run
/// # async fn demo() -> flowgrid_sdk::Result<()> {
/// use std::time::Duration;
/// use flowgrid_sdk::{Client, StartRun};
///
/// let client = Client::connect("nats://127.0.0.1:4222", "flowgrid").await?;
/// let deployed = client.deploy(std::fs::read_to_string("flows/hello.yaml").unwrap()).await?;
/// let started = client
///     .start(StartRun {
///         flow: deployed.name,
///         version: None,
///         input: serde_json::json!({"name": "world"}),
///         idempotency_key: Some("order-42".into()),
///         labels: [("customer".to_owned(), "acme".to_owned())].into(),
///         ..Default::default()
///     })
///     .await?;
/// let run = client.wait(&started.run_id, Duration::from_secs(60)).await?;
/// println!("{} ended {}: {:?}", run.run_id, run.status.as_str(), run.output);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    request_timeout: Duration,
    retry_budget: Duration,
    /// Set once this client made sure the submit stream exists; cleared when a publish
    /// finds it gone (deleted to clear a backlog, or lost with nats-server's store), so
    /// that the next try creates it again.
    submit_stream_ready: Arc<AtomicBool>,
}

/// The outcome of a durable [`Client::submit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The id the run gets once a coordinator starts it (derived from the idempotency key).
    pub run_id: RunId,
    /// The idempotency key the submission carries (the caller's, or a fresh one).
    pub idempotency_key: String,
    /// Position in the submit stream.
    pub sequence: u64,
    /// JetStream already held this submission: an earlier try of the same call stored it,
    /// and its acknowledgement was lost. Each call publishes under a message id of its own
    /// (the run id and a fresh id), so a submit sent again by a later call (after the grid
    /// refused the first, say, for a flow not deployed yet) is stored, never dropped as a
    /// duplicate; the idempotency key still makes the grid start one run for the two.
    pub duplicate: bool,
}

impl Client {
    /// Connects to NATS at `url` and talks to the grid under `prefix` (usually `flowgrid`).
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Client> {
        Client::connect_with(url, prefix, &NatsOptions::default()).await
    }

    /// [`Client::connect`] to a secured nats-server: with `options`' credentials and TLS.
    pub async fn connect_with(url: &str, prefix: impl Into<String>, options: &NatsOptions) -> Result<Client> {
        Ok(Client::new(options.connect(url, "flowgrid-client").await?, prefix))
    }

    /// Uses an existing NATS connection.
    pub fn new(nats: async_nats::Client, prefix: impl Into<String>) -> Client {
        let jetstream = jetstream::new(nats.clone());
        Client {
            nats,
            jetstream,
            subjects: Subjects::new(prefix),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            submit_stream_ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// How long one request waits for its reply (default 10 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Client {
        self.request_timeout = timeout;
        self
    }

    /// How long a call retries retryable refusals and missing coordinators (default 15 s;
    /// zero disables retries).
    pub fn with_retry_budget(mut self, budget: Duration) -> Client {
        self.retry_budget = budget;
        self
    }

    /// How long a call retries (see [`Client::with_retry_budget`]).
    pub(crate) fn retry_budget(&self) -> Duration {
        self.retry_budget
    }

    /// The pauses between the tries of a call.
    pub(crate) fn retry_backoff() -> Backoff {
        Backoff::new(RETRY_DELAY_FIRST, RETRY_DELAY_MAX)
    }

    /// The JetStream context of that connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The subjects of this grid.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The live output of a run's attempts ([`crate::Task::emit`]): every piece the grid
    /// still keeps (an hour's), in order, then each new one as it comes, until the stream is
    /// dropped. `step` narrows it to one step. A piece that cannot be decoded is an error
    /// item; the stream goes on after it. On a grid without the live-output stream (its
    /// coordinators could not create it) only the pieces published from now on come.
    pub async fn tail(&self, run_id: &RunId, step: Option<&str>) -> Result<BoxStream<'static, Result<LiveOutput>>> {
        let filter = match step {
            Some(step) => self.subjects.live(run_id.as_str(), step),
            None => self.subjects.live_of_run(run_id.as_str()),
        };
        let nats_error = |context: String, source: async_nats::Error| Error::Nats { context, source };
        let stream_name = self.subjects.live_stream();
        let kept = match self.jetstream.get_stream(&stream_name).await {
            Ok(stream) => Some(stream),
            Err(error)
                if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                None
            }
            Err(error) => return Err(nats_error(format!("open stream {stream_name}"), error.into())),
        };
        let reading = format!("read the live output on {filter}");
        let pieces: BoxStream<'static, Result<async_nats::Message>> = match kept {
            Some(stream) => {
                let config = jetstream::consumer::pull::OrderedConfig {
                    filter_subject: filter,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ..Default::default()
                };
                let consumer =
                    stream.create_consumer(config).await.map_err(|error| nats_error(reading.clone(), error.into()))?;
                let messages = consumer.messages().await.map_err(|error| nats_error(reading.clone(), error.into()))?;
                messages
                    .map(move |message| match message {
                        Ok(message) => Ok(message.message),
                        Err(error) => Err(nats_error(reading.clone(), error.into())),
                    })
                    .boxed()
            }
            None => {
                let subscriber =
                    self.nats.subscribe(filter).await.map_err(|error| nats_error(reading, error.into()))?;
                subscriber.map(Ok).boxed()
            }
        };
        Ok(pieces
            .map(|piece| {
                let piece = piece?;
                let encoding = crate::encoding_of(piece.headers.as_ref());
                Ok(decode::<LiveOutput>(encoding, &piece.payload)?)
            })
            .boxed())
    }

    /// Deploys a definition (YAML or JSON text) as a new version of its flow. A definition
    /// equal to the latest version returns that version with `created: false` (so does a
    /// deploy sent again after a timeout, when the first one was applied). A refused
    /// definition is an [`Error::Api`] with code `invalid_definition` and located `issues`.
    pub async fn deploy(&self, definition: impl Into<String>) -> Result<FlowDeployed> {
        self.call("flow.deploy", &DeployFlow { definition: definition.into() }, OnTimeout::Retry).await
    }

    /// Every deployed flow with its latest version, in name order: every page of
    /// [`Client::flows_page`].
    pub async fn flows(&self) -> Result<FlowList> {
        let mut all = self.flows_page(None, None).await?;
        while let Some(cursor) = all.next_cursor.take() {
            let page = self.flows_page(Some(cursor.clone()), None).await?;
            all.flows.extend(page.flows);
            // Names only grow from page to page; anything else would loop for good.
            if let Some(next) = page.next_cursor.as_ref().filter(|next| **next <= cursor) {
                let message = format!("flow.list went back from cursor {cursor:?} to {next:?}");
                return Err(Error::Api(ApiError::new(ErrorCode::Internal, message)));
            }
            all.next_cursor = page.next_cursor;
        }
        Ok(all)
    }

    /// One page of the deployed flows in name order: at most `limit` (1 to 1,000, the
    /// default), those named after `cursor` (the previous page's `next_cursor`).
    pub async fn flows_page(&self, cursor: Option<String>, limit: Option<u32>) -> Result<FlowList> {
        self.call("flow.list", &ListFlows { limit, cursor }, OnTimeout::Retry).await
    }

    /// The concurrency limits in use (runs going or queued under them, or a start rate
    /// refilling), of `flow` or of every flow.
    pub async fn limits(&self, flow: Option<&str>) -> Result<LimitList> {
        self.call("limit.list", &ListLimits { flow: flow.map(str::to_owned) }, OnTimeout::Retry).await
    }

    /// One version of a flow (the latest when `version` is `None`).
    pub async fn flow(&self, name: &str, version: Option<u32>) -> Result<FlowInfo> {
        self.call("flow.get", &GetFlow { name: name.to_owned(), version }, OnTimeout::Retry).await
    }

    /// Starts a run and returns its id. With an idempotency key, starting again returns
    /// the same run (`created: false`), so a start whose request timed out is sent again
    /// (within the retry budget); without one, the timeout is returned, since the run may
    /// have started.
    pub async fn start(&self, start: StartRun) -> Result<RunStarted> {
        self.call("run.start", &start, OnTimeout::retry_if(start.idempotency_key.is_some())).await
    }

    /// Starts up to [`START_MANY_RUNS_MAX`](crate::START_MANY_RUNS_MAX) runs in one request; one outcome per start, in
    /// order. Each start is applied like [`Client::start`], except that a start refused as
    /// retryable is returned as such rather than retried ([`StartBatcher`] retries them).
    ///
    /// [`StartBatcher`]: crate::StartBatcher
    pub async fn start_many(&self, starts: &[StartRun]) -> Result<Vec<Result<RunStarted>>> {
        self.try_start_many(starts).await.map_err(StartManyError::into_error)
    }

    /// [`Client::start_many`], telling a request too large to send (so none of its starts
    /// was applied) from any other failure of the whole request.
    pub(crate) async fn try_start_many(&self, starts: &[StartRun]) -> Result<Vec<Result<RunStarted>>, StartManyError> {
        // `StartRuns` borrowed: the starts are encoded without a copy.
        #[derive(Serialize)]
        struct StartRunsRef<'a> {
            runs: &'a [StartRun],
        }
        let failed = StartManyError::Failed;
        let payload =
            encode(Encoding::MsgPack, &StartRunsRef { runs: starts }).map_err(|error| failed(error.into()))?;
        let payload = Bytes::from(payload);
        self.check_fits(payload.len()).map_err(StartManyError::TooLargeToSend)?;
        let on_timeout = OnTimeout::retry_if(starts.iter().all(|start| start.idempotency_key.is_some()));
        let subject = self.subjects.api("run.start_many");
        let started: RunsStarted = self.call_encoded(subject, payload, on_timeout).await.map_err(failed)?;
        if started.results.len() != starts.len() {
            let mismatch = format!("{} outcomes for {} starts", started.results.len(), starts.len());
            return Err(failed(Error::Proto(ProtoError::Malformed {
                encoding: "msgpack",
                expected: "RunsStarted",
                source: mismatch.into(),
            })));
        }
        Ok(started.results.into_iter().map(|reply| reply.into_result().map_err(Error::Api)).collect())
    }

    /// A run's status, steps, output and error.
    pub async fn get(&self, run_id: &RunId) -> Result<RunView> {
        self.call("run.get", &GetRun { run_id: run_id.clone(), without_data: false }, OnTimeout::Retry).await
    }

    /// The run as [`Client::get`] gives it, without its input and outputs (the run's, each
    /// step's, progress reports): for a run whose view is refused as `payload_too_large`.
    pub async fn get_without_data(&self, run_id: &RunId) -> Result<RunView> {
        self.call("run.get", &GetRun { run_id: run_id.clone(), without_data: true }, OnTimeout::Retry).await
    }

    /// The run as [`Client::get`] gives it or, when that is refused as `payload_too_large`,
    /// as [`Client::get_without_data`] gives it, with the refusal: where a run is can
    /// always be read.
    pub async fn get_or_without_data(&self, run_id: &RunId) -> Result<(RunView, Option<ApiError>)> {
        match self.get(run_id).await {
            Err(Error::Api(refusal)) if refusal.code == ErrorCode::PayloadTooLarge => {
                Ok((self.get_without_data(run_id).await?, Some(refusal)))
            }
            view => Ok((view?, None)),
        }
    }

    /// One page of a run's history, oldest first: its start, then every event it accepted.
    /// Pass the page's `next` back as `after` for the next page.
    pub async fn history(&self, run_id: &RunId, after: Option<u64>, limit: Option<u32>) -> Result<RunHistory> {
        let request = GetRunHistory { run_id: run_id.clone(), after, limit };
        self.call("run.history", &request, OnTimeout::Retry).await
    }

    /// Completes an async task (one its worker detached, see [`crate::Task::detach`]) with
    /// its output, or its error (whose `retryable` lets the step's retry policy try again).
    /// `Ok(true)` when the step took it; `Ok(false)` when the attempt was no longer open: it
    /// was completed already, timed out, or its run ended (after a lost reply, a retry of
    /// this call may also say `false` for a result the first try delivered).
    pub async fn complete_task(
        &self,
        token: &TaskToken,
        outcome: std::result::Result<Value, TaskError>,
    ) -> Result<bool> {
        // The token says where its result goes: only ever to a shard of this grid.
        if !self.subjects.is_shard_results(&token.reply_to) {
            return Err(Error::Api(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the task token's result subject {:?} is not one of this grid's (prefix {:?}): a token of \
                     another grid, or not one a coordinator made",
                    token.reply_to,
                    self.subjects.prefix()
                ),
            )));
        }
        let (output, error) = match outcome {
            Ok(output) => (Some(output), None),
            Err(error) => (None, Some(error)),
        };
        let result = TaskResult { attempt: token.attempt.clone(), output, error, progress: None };
        let ack: ResultAck = self.call_subject(token.reply_to.clone(), &result, OnTimeout::Retry).await?;
        Ok(ack.applied)
    }

    /// One page of runs, newest first; pass `next_cursor` back as `cursor` for the next.
    pub async fn list(&self, query: ListRuns) -> Result<RunList> {
        self.call("run.list", &query, OnTimeout::Retry).await
    }

    /// Asks to cancel a run. Cancelling a run that already ended returns its status.
    pub async fn cancel(&self, run_id: &RunId, reason: impl Into<String>) -> Result<RunCancelled> {
        let cancel = CancelRun { run_id: run_id.clone(), reason: reason.into() };
        self.call("run.cancel", &cancel, OnTimeout::Retry).await
    }

    /// Pauses the runs a flow's schedule and trigger start (its trigger's messages wait in
    /// their stream); runs started through the API and running runs are not affected.
    /// `applied` is `false` for a flow paused already, so repeating it is safe.
    pub async fn pause_flow(&self, name: &str, reason: impl Into<String>) -> Result<FlowPaused> {
        let pause = PauseFlow { name: name.to_owned(), reason: reason.into() };
        self.call("flow.pause", &pause, OnTimeout::Retry).await
    }

    /// Lets a paused flow's schedule and trigger start runs again: the trigger goes on with
    /// the messages published meanwhile; the schedule with its next slot (those of the
    /// pause are skipped).
    pub async fn resume_flow(&self, name: &str, reason: impl Into<String>) -> Result<FlowPaused> {
        let resume = PauseFlow { name: name.to_owned(), reason: reason.into() };
        self.call("flow.resume", &resume, OnTimeout::Retry).await
    }

    /// Pauses a running run: it starts no step until it is resumed (what it started goes
    /// on). `applied` is `false` for a run paused already or one that ended, so repeating
    /// it is safe.
    pub async fn pause(&self, run_id: &RunId, reason: impl Into<String>) -> Result<RunPaused> {
        let pause = PauseRun { run_id: run_id.clone(), reason: reason.into() };
        self.call("run.pause", &pause, OnTimeout::Retry).await
    }

    /// Resumes a paused run: the steps it held start. `applied` is `false` for a run that is
    /// not paused, so repeating it is safe.
    pub async fn resume(&self, run_id: &RunId, reason: impl Into<String>) -> Result<RunPaused> {
        let resume = PauseRun { run_id: run_id.clone(), reason: reason.into() };
        self.call("run.resume", &resume, OnTimeout::Retry).await
    }

    /// Runs a run that failed, timed out or was cancelled again, from the steps that did not
    /// succeed. Not safe to repeat blindly: a repeat after the redriven run ended again
    /// redrives it once more, so a timeout is returned instead of a retry.
    pub async fn redrive(&self, run_id: &RunId, reason: impl Into<String>) -> Result<RunRedriven> {
        self.redrive_from(run_id, Vec::new(), reason).await
    }

    /// As [`Client::redrive`], and steps `from` (ids) run again with every step after
    /// them, even if they succeeded; with a step named, a succeeded run is redriven too.
    pub async fn redrive_from(
        &self,
        run_id: &RunId,
        from: Vec<String>,
        reason: impl Into<String>,
    ) -> Result<RunRedriven> {
        let redrive = RedriveRun { run_id: run_id.clone(), reason: reason.into(), from };
        self.call("run.redrive", &redrive, OnTimeout::Fail(REDRIVE_TIMEOUT_ADVICE)).await
    }

    /// Sends a signal to signal step `step` of a run; `data` becomes the step's output.
    /// The step takes the first signal sent while it waits: `applied` is `false` when it
    /// had taken another one already (or timed out, or the run ended), so repeating a
    /// signal is safe. The signal carries an id of its own, so that when its answer is lost
    /// and it is sent again, a step that took it still answers `applied: true`.
    pub async fn signal(
        &self,
        run_id: &RunId,
        step: impl Into<String>,
        data: serde_json::Value,
    ) -> Result<RunSignalled> {
        self.signal_with_id(run_id, step, data, uuid::Uuid::new_v4().to_string()).await
    }

    /// As [`Client::signal`], with the signal's `id` of the caller's choosing (1 to 128
    /// bytes): a caller that sends the signal again itself (its own retry after a crash, an
    /// HTTP request's `Idempotency-Key`) gives it the same id and learns whether it was taken.
    pub async fn signal_with_id(
        &self,
        run_id: &RunId,
        step: impl Into<String>,
        data: serde_json::Value,
        id: String,
    ) -> Result<RunSignalled> {
        let signal = SignalRun { run_id: run_id.clone(), step: step.into(), data, id: Some(id) };
        self.call("run.signal", &signal, OnTimeout::Retry).await
    }

    /// Starts the child run of a subflow step (coordinators send this; a repeat returns the
    /// same child with `created: false`).
    pub async fn start_child(&self, start: &StartChildRun) -> Result<RunStarted> {
        self.call("run.start_child", start, OnTimeout::Retry).await
    }

    /// Reports a child run's end to its parent (coordinators send this; a repeat answers
    /// `applied: false`).
    pub async fn child_ended(&self, ended: &ChildRunEnded) -> Result<ChildEndTaken> {
        self.call("run.child_ended", ended, OnTimeout::Retry).await
    }

    /// Sends a message about a run's place under its flow's concurrency limit: `verb` is
    /// `gate.acquire`, `gate.release` or `run.admit` (coordinators send these; a repeat
    /// answers `applied: false`).
    pub async fn gate(&self, verb: &str, message: &GateMessage) -> Result<GateTaken> {
        self.call(verb, message, OnTimeout::Retry).await
    }

    /// Polls the run (every 20 ms, slowing to every 500 ms; without its data) until it
    /// ends, and returns it with its data. [`Error::Timeout`] when it is still running
    /// after `timeout`; a run too large for one message ends the wait with the refusal
    /// `payload_too_large` ([`Client::get_or_without_data`] reads it then).
    pub async fn wait(&self, run_id: &RunId, timeout: Duration) -> Result<RunView> {
        let started = Instant::now();
        let timed_out = || Error::Timeout { what: format!("waiting for run {run_id}"), after: timeout };
        let mut backoff = Backoff::new(WAIT_POLL_FIRST, WAIT_POLL_MAX);
        loop {
            // A poll retries no longer than the wait has left, so an unreachable grid ends
            // the wait at its timeout, not a retry budget later.
            let left = timeout.saturating_sub(started.elapsed());
            let request_timeout = self.request_timeout.min(left.max(WAIT_REQUEST_TIMEOUT_MIN));
            let polling = self.clone().with_retry_budget(left).with_request_timeout(request_timeout);
            match polling.get_without_data(run_id).await {
                // The whole view (with its data), read as any other get: the run has ended,
                // so what is left of the wait (a few ms near its end) bounds it no more.
                Ok(view) if view.status.is_terminal() => return self.get(run_id).await,
                Ok(_) => {}
                Err(error) if started.elapsed() >= timeout && should_retry(&error, OnTimeout::Retry) => {
                    return Err(timed_out())
                }
                Err(error) => return Err(error),
            }
            match backoff.next_delay_within(timeout.saturating_sub(started.elapsed())) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(timed_out()),
            }
        }
    }

    /// Durable fire-and-forget start: publishes the request to the submit stream and
    /// returns once JetStream has stored it, even if no coordinator is running; a
    /// coordinator starts the run when it drains the stream.
    ///
    /// A submission without an idempotency key gets a fresh one, so the run id is known
    /// up front and a retried publish cannot start the run twice.
    pub async fn submit(&self, mut start: StartRun) -> Result<Submitted> {
        // No one hears the coordinator refuse a stored submission: refuse what it would now.
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        if let Some(refusal) = start.refusal(now_ms) {
            return Err(Error::Api(refusal));
        }
        let key = start.idempotency_key.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        let run_id = RunId::from_idempotency_key(&start.flow, &key);
        let payload = Bytes::from(encode(Encoding::MsgPack, &start)?);
        flowgrid_proto::check_fits_server("the submission", payload.len(), || self.nats.server_info().max_payload)
            .map_err(Error::Api)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, submit_message_id(&run_id).as_str());
        let subject = self.subjects.submit();
        let started = Instant::now();
        let mut backoff = Client::retry_backoff();
        // Each try makes sure the stream exists first: a JetStream out of reach for a moment
        // (nats-server restarting) is retried within the budget, as a failed publish is.
        loop {
            let attempt = match self.ensure_submit_stream().await {
                Ok(()) => self.publish_once(&subject, headers.clone(), payload.clone()).await,
                Err(error) => Err(error),
            };
            let error = match attempt {
                Ok(ack) => {
                    return Ok(Submitted {
                        run_id,
                        idempotency_key: key,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    })
                }
                Err(error) => error,
            };
            if is_stream_not_found(&error) {
                // Gone since it was made: the next try makes it again.
                self.submit_stream_ready.store(false, Ordering::Release);
            }
            // The message id makes a repeated publish harmless, so every failure is retried.
            match backoff.next_delay_within(self.retry_budget.saturating_sub(started.elapsed())) {
                Some(delay) => {
                    debug!(subject = %subject, error = %error, delay_ms = delay.as_millis() as u64, "retrying submit");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(error),
            }
        }
    }

    async fn publish_once(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck> {
        let context = || format!("durable submit to {subject} failed");
        let pending = self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|source| Error::Nats { context: context(), source: Box::new(source) })?;
        pending.await.map_err(|source| Error::Nats { context: context(), source: Box::new(source) })
    }

    /// Creates the submit stream unless this client did so since it last found it gone.
    /// Creating it is idempotent, so clones that do it at once are harmless.
    async fn ensure_submit_stream(&self) -> Result<()> {
        if self.submit_stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        broker::submit_stream(&self.jetstream, &self.subjects, &BrokerLimits::default()).await?;
        self.submit_stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Sends one API request, retrying what [`should_retry`] allows within the budget.
    async fn call<Request: Serialize, Response: DeserializeOwned>(
        &self,
        verb: &str,
        request: &Request,
        on_timeout: OnTimeout,
    ) -> Result<Response> {
        self.call_subject(self.subjects.api(verb), request, on_timeout).await
    }

    /// Sends `request` on `subject` and retries as [`Client::call`] does.
    async fn call_subject<Request: Serialize, Response: DeserializeOwned>(
        &self,
        subject: String,
        request: &Request,
        on_timeout: OnTimeout,
    ) -> Result<Response> {
        let payload = Bytes::from(encode(Encoding::MsgPack, request)?);
        self.check_fits(payload.len()).map_err(Error::Api)?;
        self.call_encoded(subject, payload, on_timeout).await
    }

    /// Refuses a request of `bytes` over what one message may carry on this NATS server,
    /// before it is sent.
    fn check_fits(&self, bytes: usize) -> Result<(), ApiError> {
        flowgrid_proto::check_fits_server("the request", bytes, || self.nats.server_info().max_payload)
    }

    /// Sends the encoded request `payload` on `subject` and retries as [`Client::call`] does.
    async fn call_encoded<Response: DeserializeOwned>(
        &self,
        subject: String,
        payload: Bytes,
        on_timeout: OnTimeout,
    ) -> Result<Response> {
        let started = Instant::now();
        let mut backoff = Client::retry_backoff();
        // The first try waits the whole request timeout. A retry of a call that is safe to
        // repeat waits no longer than the budget has left, so the call ends within the larger
        // of the two; one that is not safe to repeat (retried only when no coordinator
        // took it) waits the whole timeout again, so that a coordinator that answers late
        // is not taken for one that may have applied it: that call ends within the budget
        // and a timeout.
        let mut timeout = self.request_timeout;
        // A timeout says how long every try took together, and how many there were.
        let mut tries = 0;
        let given_up = |error: Error, tries: u32| match error {
            Error::Timeout { .. } => Error::request_timed_out(&subject, tries, started.elapsed(), on_timeout.advice()),
            error => error,
        };
        loop {
            tries += 1;
            let attempt = self.request_once(&subject, payload.clone(), timeout).await;
            let error = match attempt {
                Err(error) if should_retry(&error, on_timeout) => error,
                Err(error) => return Err(given_up(error, tries)),
                done => return done,
            };
            match backoff.next_delay_within(self.retry_budget.saturating_sub(started.elapsed())) {
                Some(delay) => {
                    debug!(subject = %subject, error = %error, delay_ms = delay.as_millis() as u64, "retrying request");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(given_up(error, tries)),
            }
            let left = self.retry_budget.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(given_up(error, tries));
            }
            if on_timeout == OnTimeout::Retry {
                timeout = self.request_timeout.min(left);
            }
        }
    }

    async fn request_once<Response: DeserializeOwned>(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Response> {
        let request = async_nats::Request::new().payload(payload).timeout(Some(timeout));
        let message =
            self.nats.send_request(subject.to_owned(), request).await.map_err(|source| match source.kind() {
                // The caller counts the tries and adds up their time.
                async_nats::RequestErrorKind::TimedOut => {
                    Error::Timeout { what: format!("request on {subject}"), after: timeout }
                }
                async_nats::RequestErrorKind::NoResponders => Error::Nats {
                    context: format!(
                        "no coordinator answers on {subject} (is one running with prefix {:?}?)",
                        self.subjects.prefix()
                    ),
                    source: Box::new(source),
                },
                _ => Error::Nats { context: format!("request on {subject} failed"), source: Box::new(source) },
            })?;
        let encoding = crate::encoding_of(message.headers.as_ref());
        let reply: Reply<Response> = decode(encoding, &message.payload)?;
        reply.into_result().map_err(Error::Api)
    }
}

/// How a `run.start_many` request failed as a whole ([`Client::try_start_many`]).
#[derive(Debug)]
pub(crate) enum StartManyError {
    /// Over what one message may carry on this NATS server: the client did not send it, so
    /// none of its starts was applied.
    TooLargeToSend(ApiError),
    /// Sent, or tried: the grid refused the whole request, it timed out, or it could not be
    /// sent or its reply read.
    Failed(Error),
}

impl StartManyError {
    /// The failure as [`Client::start_many`] returns it.
    pub(crate) fn into_error(self) -> Error {
        match self {
            StartManyError::TooLargeToSend(refusal) => Error::Api(refusal),
            StartManyError::Failed(error) => error,
        }
    }
}

/// What to do about a start without an idempotency key whose request timed out.
const START_TIMEOUT_ADVICE: &str = "read the run before sending it again, or give starts an idempotency_key";
/// What to do about a redrive whose request timed out.
const REDRIVE_TIMEOUT_ADVICE: &str = "read the run (its status and redrive count) before sending it again";

/// What a call does when its request times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnTimeout {
    /// Sends it again: it only reads, or applying it twice is applying it once.
    Retry,
    /// Returns the timeout, which says that the coordinator may have applied the request
    /// and what to do (the advice given) before sending it again.
    Fail(&'static str),
}

impl OnTimeout {
    /// For starts: sent again when `safe` (every start carries an idempotency key).
    pub(crate) fn retry_if(safe: bool) -> OnTimeout {
        if safe {
            OnTimeout::Retry
        } else {
            OnTimeout::Fail(START_TIMEOUT_ADVICE)
        }
    }

    /// What a timeout of a request not safe to repeat says to do.
    fn advice(self) -> Option<&'static str> {
        match self {
            OnTimeout::Retry => None,
            OnTimeout::Fail(advice) => Some(advice),
        }
    }
}

/// The `Nats-Msg-Id` of a durable submit of run `run_id`: the run id and a fresh id of the
/// call, so that JetStream drops the tries of one call after the first it stored, and no
/// other call's. A message id of the run id alone outlived the submit in the stream's
/// duplicate window once a coordinator refused and removed it: the same key submitted
/// again, after the flow was deployed, was acknowledged as a duplicate and dropped.
fn submit_message_id(run_id: &RunId) -> String {
    format!("{run_id}:{}", uuid::Uuid::new_v4().simple())
}

/// True when a durable submit found no stream on its subject.
fn is_stream_not_found(error: &Error) -> bool {
    match error {
        Error::Nats { source, .. } => source
            .downcast_ref::<jetstream::context::PublishError>()
            .is_some_and(|error| error.kind() == jetstream::context::PublishErrorKind::StreamNotFound),
        _ => false,
    }
}

/// A call is repeated when the grid says it may succeed later, when nobody answered (no
/// coordinator subscribed yet), or when it timed out and repeating it is safe.
pub(crate) fn should_retry(error: &Error, on_timeout: OnTimeout) -> bool {
    match error {
        // An owner that did not answer a forwarded request: as a timeout of the call's own.
        Error::Api(refusal) => {
            refusal.retryable || (refusal.code == ErrorCode::Unavailable && on_timeout == OnTimeout::Retry)
        }
        Error::Timeout { .. } => on_timeout == OnTimeout::Retry,
        other => other.is_no_responders(),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn request_error(kind: async_nats::RequestErrorKind) -> Error {
        Error::Nats { context: "request".into(), source: Box::new(async_nats::RequestError::new(kind)) }
    }

    #[test]
    fn retryable_refusals_and_missing_coordinators_are_retried() {
        for on_timeout in [OnTimeout::Retry, OnTimeout::retry_if(false)] {
            assert!(should_retry(&Error::Api(ApiError::new(ErrorCode::Unavailable, "shard moving")), on_timeout));
            assert!(should_retry(&Error::Api(ApiError::new(ErrorCode::Overloaded, "queue full")), on_timeout));
            assert!(should_retry(&request_error(async_nats::RequestErrorKind::NoResponders), on_timeout));
        }
    }

    #[test]
    fn final_refusals_are_not_retried_and_timeouts_only_when_repeating_is_safe() {
        let timeout = Error::Timeout { what: "request".into(), after: Duration::from_secs(10) };
        for on_timeout in [OnTimeout::Retry, OnTimeout::retry_if(false)] {
            assert!(!should_retry(&Error::Api(ApiError::new(ErrorCode::NotFound, "no such run")), on_timeout));
            assert!(!should_retry(&Error::Api(ApiError::new(ErrorCode::InvalidDefinition, "bad")), on_timeout));
            assert!(!should_retry(&request_error(async_nats::RequestErrorKind::Other), on_timeout));
        }
        assert!(should_retry(&timeout, OnTimeout::Retry));
        assert!(!should_retry(&timeout, OnTimeout::retry_if(false)));
    }
}
