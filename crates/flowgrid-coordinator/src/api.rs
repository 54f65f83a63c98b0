//! The API over NATS: `<prefix>.api.<verb>` in a queue group, so each request reaches one
//! coordinator, which routes it to the owner of the shard concerned.
//!
//! Requests are bounded: at most `api_concurrency_max` are handled at once; past that a
//! request is refused as `overloaded` at once instead of queueing without bound.

use std::sync::Arc;

use ::metrics::Counter;
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use flowgrid_model::limits::{
    msgpack_bytes, nesting_depth, ErrorCodeProblem, CONCURRENCY_KEY_BYTES_MAX, CONCURRENCY_MAX, DURATION_MS_MAX,
    REASON_BYTES_MAX, SIGNAL_ID_BYTES_MAX, SUBFLOW_DEPTH_MAX,
};
use flowgrid_model::{parse_definition, FlowPlan, InputSchema, Limits, ParentRef, RunId, ShardId};
use flowgrid_proto::{
    ApiError, CancelRun, ChildEndTaken, ChildRunEnded, DeployFlow, Encoding, ErrorCode, FlowList, FlowPaused,
    GateMessage, GateTaken, GetFlow, GetRun, GetRunHistory, LimitList, LimitSummary, ListFlows, ListLimits, ListRuns,
    PauseFlow, PauseRun, RedriveRun, Reply, RunList, RunPaused, RunRedriven, RunStarted, RunSummary, RunsStarted,
    SignalRun, StartChildRun, StartRun, StartRuns, START_MANY_RUNS_MAX,
};
use flowgrid_sdk::trigger_stream::{check_trigger_stream, trigger_loop, TriggerStreamError};
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::error::cut;
use crate::metrics;
use crate::routing::{unexpected, LimitsPage, Router, ShardReply, ShardRequest};
use crate::shard::{gate_routing_key, FlowsPage, GateVerb, RunsPage, HISTORY_PAGE_MAX};

/// Page size of `run.list` when the request gives none.
const LIST_LIMIT_DEFAULT: u32 = 50;
/// Largest page of `run.list`: bounds one reply.
const LIST_LIMIT_MAX: u32 = 1_000;
/// Flows per `flow.list` page at most, and by default (a page also ends before 256 KiB of
/// flows).
const FLOW_LIST_LIMIT_MAX: u32 = 1_000;
/// Every API verb.
const VERBS: [&str; 21] = [
    "flow.deploy",
    "flow.list",
    "flow.get",
    "flow.pause",
    "flow.resume",
    "run.start",
    "run.start_many",
    "run.get",
    "run.history",
    "run.list",
    "run.cancel",
    "run.redrive",
    "run.pause",
    "run.resume",
    "run.signal",
    "run.start_child",
    "run.child_ended",
    "gate.acquire",
    "gate.release",
    "run.admit",
    "limit.list",
];

/// Serves API requests by asking the owners of the shards concerned.
pub struct Api {
    pub router: Arc<Router>,
    pub limits: Limits,
    pub requests: RequestCounters,
    /// Requests that ask every shard at once, at most [`FAN_OUTS_MAX`]; the others are
    /// refused (see [`fan_out_permit`]).
    pub fan_outs: Semaphore,
}

/// Requests handled, by verb (in the order of [`VERBS`], then unknown verbs) and outcome.
pub struct RequestCounters([[Counter; 2]; VERBS.len() + 1]);

impl RequestCounters {
    pub fn register() -> RequestCounters {
        // Only known verbs become label values: labels must stay low-cardinality.
        let verbs: [&'static str; VERBS.len() + 1] =
            std::array::from_fn(|index| VERBS.get(index).copied().unwrap_or("unknown"));
        RequestCounters(verbs.map(|verb| {
            ["ok", "error"]
                .map(|outcome| ::metrics::counter!(metrics::API_REQUESTS, "verb" => verb, "outcome" => outcome))
        }))
    }

    fn count(&self, verb: &str, succeeded: bool) {
        let verb = VERBS.iter().position(|known| *known == verb).unwrap_or(VERBS.len());
        self.0[verb][usize::from(!succeeded)].increment(1);
    }
}

/// The longest run id a request may name (see [`check_run_id`]): the grid's run ids are
/// UUIDs (36 bytes), and the id goes into a stored key (which a store may refuse as too
/// large), to every shard (a list's parent), or into a refusal's message.
const RUN_ID_BYTES_MAX: usize = 64;
/// The longest cursor of a run listing: a creation time, a dot and a run id.
const CURSOR_BYTES_MAX: usize = 20 + 1 + RUN_ID_BYTES_MAX;

/// Shards asked at once by requests that cover every shard (lists).
const FAN_OUT_MAX: usize = 32;
/// Requests that cover every shard served at once: each may gather a page from every
/// shard (64 pages of up to 1,001 runs and 512 KiB), so their number bounds the memory
/// they take.
pub const FAN_OUTS_MAX: usize = 16;

/// A refusal of a request because a bound of this coordinator is reached (`overloaded`,
/// retryable), counted in [`metrics::API_REJECTED`], which the overload alert watches: every
/// such refusal goes through here.
pub(crate) fn overloaded(message: impl Into<String>) -> ApiError {
    ::metrics::counter!(metrics::API_REJECTED).increment(1);
    ApiError::new(ErrorCode::Overloaded, message)
}

/// A permit to ask every shard, or `overloaded` when [`FAN_OUTS_MAX`] requests do already.
/// The request does not wait for one: it holds an API permit meanwhile, and while a shard
/// moves (each fan-out then waits up to [`crate::routing::MOVE_WAIT`] for it) the waiting
/// requests would pile up and take every API permit.
fn fan_out_permit(fan_outs: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    fan_outs.try_acquire().map_err(|refusal| match refusal {
        tokio::sync::TryAcquireError::NoPermits => overloaded(format!(
            "the coordinator is serving {FAN_OUTS_MAX} requests that ask every shard (lists), the most it serves at \
             once; retry later"
        )),
        tokio::sync::TryAcquireError::Closed => {
            ApiError::new(ErrorCode::Unavailable, "the coordinator is stopping; retry")
        }
    })
}

/// On a graceful stop, how long the API may take to receive the requests already sent to it,
/// and then again to answer them: the longest an answer takes when the shards answer (it
/// waits for a moving shard, then for the owner it forwards to) and room for a busy host.
const API_DRAIN_WAIT: std::time::Duration = crate::routing::MOVE_WAIT
    .saturating_add(crate::routing::FORWARD_TIMEOUT)
    .saturating_add(std::time::Duration::from_secs(3));

/// The encoding a message's `Content-Type` header selects (its name in any case).
pub fn encoding_of(message: &Message) -> Encoding {
    flowgrid_sdk::encoding_of(message.headers.as_ref())
}

/// Serves the API until `shutdown`, then stops taking requests and answers those it has
/// taken: the server sends no more (the subscription drains), and every request already
/// received, waiting in the subscription or being handled, gets its answer, before this
/// returns (the shards are still served meanwhile) or, for one still waiting for its shard
/// after [`API_DRAIN_WAIT`], once the shard answers or stops (see [`answer_taken`]).
pub async fn serve(
    api: Arc<Api>,
    mut requests: async_nats::Subscriber,
    concurrency_max: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency_max));
    let mut handlers = tokio::task::JoinSet::new();
    // Armed once draining: by then the requests received must have been taken (a server
    // gone meanwhile never confirms the drain).
    let drained_by = tokio::time::sleep(API_DRAIN_WAIT);
    tokio::pin!(drained_by);
    let mut draining = false;
    loop {
        while handlers.try_join_next().is_some() {}
        let message = tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
                // Without NATS no answer could go out: stop at once.
                if api.router.context.nats.connection_state() != async_nats::connection::State::Connected {
                    break;
                }
                draining = true;
                drained_by.as_mut().reset(tokio::time::Instant::now() + API_DRAIN_WAIT);
                if let Err(error) = requests.drain().await {
                    debug!(error = %error, "cannot drain the API subscription; requests not yet taken are lost");
                    break;
                }
                continue;
            }
            _ = &mut drained_by, if draining => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Some(reply_to) = message.reply.clone() else {
            debug!(subject = %message.subject, "API message without a reply subject ignored; use a request");
            continue;
        };
        let encoding = encoding_of(&message);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let error = overloaded("the coordinator is handling too many requests; retry later");
            send_reply(&api.router.context.nats, reply_to, encoding, &Reply::<()>::Error(error)).await;
            continue;
        };
        let api = api.clone();
        handlers.spawn(async move {
            let verb = message
                .subject
                .strip_prefix(&format!("{}.api.", api.router.context.subjects.prefix()))
                .unwrap_or("")
                .to_owned();
            let (reply, succeeded) = api.dispatch(&verb, encoding, &message.payload).await;
            api.requests.count(&verb, succeeded);
            publish(&api.router.context.nats, reply_to, encoding, reply).await;
            drop(permit);
        });
    }
    answer_taken(handlers).await;
}

/// Waits up to [`API_DRAIN_WAIT`] for the requests being handled to be answered. Those
/// still waiting then are left to finish on their own, not aborted: a command already
/// queued in a shard (a start, a cancel) is applied all the same, and its caller gets its
/// answer, which the shard gives as it goes on serving or as it stops (what it has not
/// taken is then answered `unavailable`).
async fn answer_taken(mut handlers: tokio::task::JoinSet<()>) {
    let answered = tokio::time::timeout(API_DRAIN_WAIT, async { while handlers.join_next().await.is_some() {} }).await;
    if answered.is_err() {
        warn!(
            requests = handlers.len(),
            "API requests still being handled when the coordinator stopped taking requests; each is answered when \
             its shard answers or stops"
        );
        handlers.detach_all();
    }
}

impl Api {
    /// Handles one request; returns the encoded reply and whether it succeeded.
    async fn dispatch(&self, verb: &str, encoding: Encoding, payload: &[u8]) -> (Vec<u8>, bool) {
        match verb {
            "flow.deploy" => call(encoding, payload, |request| self.deploy(request)).await,
            "flow.list" => call(encoding, payload, |request| self.list_flows(request)).await,
            "flow.get" => call(encoding, payload, |request: GetFlow| self.get_flow(request)).await,
            "flow.pause" => call(encoding, payload, |request| self.pause_flow(request, true)).await,
            "flow.resume" => call(encoding, payload, |request| self.pause_flow(request, false)).await,
            "run.start" => {
                let request_bytes = msgpack_request_bytes(encoding, payload);
                call(encoding, payload, |request| self.start_run(request, None, request_bytes, None)).await
            }
            "run.start_child" => {
                let request_bytes = msgpack_request_bytes(encoding, payload);
                call(encoding, payload, |request| self.start_child(request, request_bytes)).await
            }
            "run.child_ended" => call(encoding, payload, |request| self.child_ended(request)).await,
            "gate.acquire" => call(encoding, payload, |request| self.gate(GateVerb::Acquire, request)).await,
            "gate.release" => call(encoding, payload, |request| self.gate(GateVerb::Release, request)).await,
            "run.admit" => call(encoding, payload, |request| self.gate(GateVerb::Admit, request)).await,
            "run.start_many" => {
                let request_bytes = msgpack_request_bytes(encoding, payload);
                call(encoding, payload, |request| self.start_runs(request, request_bytes, encoding)).await
            }
            "run.get" => call(encoding, payload, |request: GetRun| self.get_run(request)).await,
            "run.history" => call(encoding, payload, |request| self.run_history(request)).await,
            "limit.list" => call(encoding, payload, |request| self.list_limits(request)).await,
            "run.list" => call(encoding, payload, |request| self.list_runs(request, encoding)).await,
            "run.cancel" => call(encoding, payload, |request| self.cancel_run(request)).await,
            "run.redrive" => call(encoding, payload, |request| self.redrive_run(request)).await,
            "run.pause" => call(encoding, payload, |request| self.pause_run(request, true)).await,
            "run.resume" => call(encoding, payload, |request| self.pause_run(request, false)).await,
            "run.signal" => {
                let request_bytes = msgpack_request_bytes(encoding, payload);
                call(encoding, payload, |request| self.signal_run(request, request_bytes)).await
            }
            other => respond::<()>(
                encoding,
                Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown API verb {other:?}; verbs are {}", VERBS.join(", ")),
                )),
            ),
        }
    }

    /// Asks the owner of `shard` and picks the expected kind of reply.
    async fn ask<T>(
        &self,
        shard: ShardId,
        request: ShardRequest,
        pick: impl FnOnce(ShardReply) -> Result<T, ShardReply>,
    ) -> Result<T, ApiError> {
        let reply = self.router.call(shard, request).await?;
        pick(reply).map_err(|other| unexpected(&other))
    }

    /// Asks every shard, a few at a time, and gathers their answers; `compact` may trim what
    /// was gathered after each answer, so that a request holds about one page, not one per
    /// shard.
    async fn ask_all<T>(
        &self,
        request: ShardRequest,
        pick: impl Fn(ShardReply) -> Result<Vec<T>, ShardReply> + Copy,
        compact: impl FnMut(&mut Vec<T>),
    ) -> Result<Vec<T>, ApiError> {
        self.ask_each(|shard| self.ask(shard, request.clone(), pick), compact).await
    }

    /// [`Api::ask_all`] with a question of its own for each shard (`ask`).
    async fn ask_each<T, F>(
        &self,
        ask: impl Fn(ShardId) -> F,
        mut compact: impl FnMut(&mut Vec<T>),
    ) -> Result<Vec<T>, ApiError>
    where
        F: std::future::Future<Output = Result<Vec<T>, ApiError>>,
    {
        let _fan_out = fan_out_permit(&self.fan_outs)?;
        let mut answers =
            futures::stream::iter((0..self.router.shards()).map(ShardId)).map(ask).buffer_unordered(FAN_OUT_MAX);
        let mut gathered = Vec::new();
        while let Some(answer) = answers.try_next().await? {
            gathered.extend(answer);
            compact(&mut gathered);
        }
        Ok(gathered)
    }

    async fn deploy(&self, request: DeployFlow) -> Result<flowgrid_proto::FlowDeployed, ApiError> {
        let definition = parse_definition(&request.definition, &self.limits).map_err(definition_refused)?;
        if let Some(trigger) = &definition.trigger {
            // The catalog shard validates the definition too, but the trigger's stream is
            // looked up here first: a name that is no stream's (NATS does not look it up)
            // is a mistake in the definition to fix, not an outage to retry.
            let plans = &self.router.context.plans;
            flowgrid_model::validate(&definition, plans.evaluator(), plans.limits()).map_err(definition_refused)?;
            if let Some(issue) = trigger_loop(&self.router.context.subjects, &definition) {
                return Err(trigger_refusal(&issue.path, issue.message));
            }
            self.check_trigger_stream(&definition.name, trigger).await?;
        }
        let catalog = self.router.shard_of(&definition.name);
        let request = ShardRequest::Deploy { definition: Box::new(definition) };
        self.ask(catalog, request, |reply| match reply {
            ShardReply::Deployed(deployed) => Ok(deployed),
            other => Err(other),
        })
        .await
    }

    /// Refuses a trigger that could never start a run (see
    /// [`flowgrid_sdk::trigger_stream::check_trigger_stream`]); `flow`'s trigger consumer is
    /// the one a work-queue or interest stream needs made beforehand.
    async fn check_trigger_stream(&self, flow: &str, trigger: &flowgrid_model::Trigger) -> Result<(), ApiError> {
        let context = &self.router.context;
        let consumer = context.subjects.trigger_consumer(flow);
        check_trigger_stream(context.client.jetstream(), trigger, &consumer).await.map_err(|error| match error {
            TriggerStreamError::Refused(issue) => trigger_refusal(&issue.path, issue.message),
            lookup @ TriggerStreamError::Lookup { .. } => ApiError::new(ErrorCode::Unavailable, lookup.to_string()),
        })
    }

    async fn pause_flow(&self, request: PauseFlow, pause: bool) -> Result<FlowPaused, ApiError> {
        check_reason(&request.reason)?;
        let catalog = self.router.shard_of(&request.name);
        self.ask(catalog, ShardRequest::PauseFlow { request, pause }, |reply| match reply {
            ShardReply::FlowPaused(paused) => Ok(paused),
            other => Err(other),
        })
        .await
    }

    async fn list_flows(&self, request: ListFlows) -> Result<FlowList, ApiError> {
        let limit = page_limit(request.limit, FLOW_LIST_LIMIT_MAX, FLOW_LIST_LIMIT_MAX)?;
        if let Some(cursor) = request.cursor.as_deref().filter(|cursor| !self.is_flow_name(cursor)) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("cursor {:?} is no flow's name; pass the `next_cursor` of the previous page", cut(cursor)),
            ));
        }
        let after = request.cursor.as_deref();
        // The pages so far as one: a shard's page holds at most a whole reply.
        let keep = |pages: &mut Vec<FlowsPage>| {
            let merged = FlowsPage::merge(pages.drain(..), limit);
            pages.push(merged);
        };
        let page = FlowsPage::merge(self.ask_each(|shard| self.flows_page(shard, after, limit), keep).await?, limit);
        let next_cursor = page.flows.last().filter(|_| page.more).map(|last| last.name.clone());
        Ok(FlowList { flows: page.flows, next_cursor })
    }

    /// The flows of `shard` named after `after`, a page of at most `limit`. A coordinator of
    /// an earlier version cannot read the question (`invalid_request`) and is asked for
    /// all of its flows, as it was then, during a rolling upgrade.
    async fn flows_page(&self, shard: ShardId, after: Option<&str>, limit: usize) -> Result<Vec<FlowsPage>, ApiError> {
        let query = ShardRequest::FlowsPage { after: after.map(str::to_owned), limit };
        let pick = |reply| match reply {
            ShardReply::FlowsPage(page) => Ok(page),
            other => Err(other),
        };
        let page = match self.ask(shard, query, pick).await {
            Err(error) if error.code == ErrorCode::InvalidRequest => {
                let pick = |reply| match reply {
                    ShardReply::Flows(flows) => Ok(flows),
                    other => Err(other),
                };
                let flows = self.ask(shard, ShardRequest::ListFlows, pick).await?;
                FlowsPage::after(flows, after)
            }
            page => page?,
        };
        Ok(vec![page])
    }

    async fn get_flow(&self, request: GetFlow) -> Result<flowgrid_proto::FlowInfo, ApiError> {
        let catalog = self.router.shard_of(&request.name);
        let request = ShardRequest::GetFlow { name: request.name, version: request.version };
        self.ask(catalog, request, |reply| match reply {
            ShardReply::Flow(info) => Ok(*info),
            other => Err(other),
        })
        .await
    }

    /// Starts a run. `default_key` is the idempotency key used when the request has none
    /// (the durable submit path passes the stream sequence, so a redelivery starts nothing
    /// new; a child run's start, the key that follows from its parent).
    /// `request_bytes` is the size of the request when it came as MessagePack (see
    /// [`msgpack_request_bytes`]). `parent` is set for the child run of a subflow step.
    pub async fn start_run(
        &self,
        request: StartRun,
        default_key: Option<String>,
        request_bytes: Option<usize>,
        parent: Option<ParentRef>,
    ) -> Result<RunStarted, ApiError> {
        check_payload(&self.limits, "input", &request.input, request_bytes)?;
        // Most starts have no start time: the clock is read only for those that do.
        let now = if request.start_at_ms.is_some() { now_ms() } else { 0 };
        if let Some(refusal) = request.refusal(now) {
            return Err(refusal);
        }
        // A durable submit without a key of its own is keyed by its place in the stream.
        let key = request.idempotency_key.clone().or(default_key);
        let start_at = request.start_at_ms;
        if !self.is_flow_name(&request.flow) {
            // No flow has that name; it is not echoed whole (a `run.start_many` reply
            // would echo each of up to 1,000 names, control characters escaped).
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no flow named {:?}; deploy it first (`flowgrid flow deploy FILE`)", cut(&request.flow)),
            ));
        }
        let plan = self.router.plan(&request.flow, request.version).await?;
        if let Some(schema) = &plan.input_schema {
            if let Err(refusal) = check_input(&plan, schema, &request.input) {
                // A repeat of a keyed start is answered with its run, whatever the schema
                // of a version deployed since says of its input.
                return match &key {
                    Some(key) => self.existing_run(&request.flow, key).await?.ok_or(refusal),
                    None => Err(refusal),
                };
            }
        }
        let run_id = match &key {
            Some(key) => RunId::from_idempotency_key(&request.flow, key),
            None => RunId::from_parts(now_ms(), uuid::Uuid::new_v4().as_u128()),
        };
        let shard = self.router.shard_of(run_id.as_str());
        let start = ShardRequest::Start {
            run_id,
            flow: request.flow,
            version: plan.version,
            input: request.input,
            idempotent: key.is_some(),
            parent,
            labels: request.labels,
            start_at,
        };
        self.ask(shard, start, |reply| match reply {
            ShardReply::Started(started) => Ok(started),
            other => Err(other),
        })
        .await
    }

    /// Starts each run of the request as [`Api::start_run`] would, all at once, so that
    /// their shards commit them in few batches. The request's size bounds each input's; the
    /// reply (in `encoding`) keeps within [`START_MANY_REPLY_BYTES_WHOLE`] the refusals it
    /// holds whole (see [`fit_outcomes`]).
    async fn start_runs(
        &self,
        request: StartRuns,
        request_bytes: Option<usize>,
        encoding: Encoding,
    ) -> Result<RunsStarted, ApiError> {
        let count = request.runs.len();
        if count == 0 || count > START_MANY_RUNS_MAX {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("runs must hold 1 to {START_MANY_RUNS_MAX} starts, it holds {count}; split larger batches"),
            ));
        }
        let starts = request.runs.into_iter().map(|start| self.start_run(start, None, request_bytes, None));
        let mut results: Vec<Reply<RunStarted>> =
            futures::future::join_all(starts).await.into_iter().map(Reply::from).collect();
        fit_outcomes(&mut results, encoding);
        Ok(RunsStarted { results })
    }

    /// Starts the child run of a subflow step, with the idempotency key that follows from
    /// its parent: sent again, it returns the same child.
    async fn start_child(&self, request: StartChildRun, request_bytes: Option<usize>) -> Result<RunStarted, ApiError> {
        let StartChildRun { flow, version, input, parent, labels } = request;
        check_run_id("parent.run_id", &parent.run_id)?;
        if parent.depth > SUBFLOW_DEPTH_MAX {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "sub-flows nest {SUBFLOW_DEPTH_MAX} deep at most; step `{}` of run {} would start a run of \
                     flow `{flow}` {} deep: does the flow start itself without end?",
                    parent.step, parent.run_id, parent.depth
                ),
            ));
        }
        // The grid's own key, which a caller's start may not carry.
        let key = ParentRef::child_key(&parent.run_id, &parent.step, parent.item, parent.round);
        let start = StartRun {
            flow,
            version,
            input: Arc::unwrap_or_clone(input),
            idempotency_key: None,
            labels,
            start_at_ms: None,
        };
        self.start_run(start, Some(key), request_bytes, Some(parent)).await
    }

    /// Hands a child run's end to the shard of its parent run, unless it is one the grid
    /// would not send (see [`check_child_end`]).
    async fn child_ended(&self, ended: ChildRunEnded) -> Result<ChildEndTaken, ApiError> {
        check_child_end(&self.limits, &ended)?;
        let shard = self.router.shard_of(ended.parent.as_str());
        self.ask(shard, ShardRequest::ChildEnded(ended), |reply| match reply {
            ShardReply::ChildEndTaken(taken) => Ok(taken),
            other => Err(other),
        })
        .await
    }

    /// Hands a message about a run's place under a concurrency limit to the limit's shard
    /// (acquire, release) or to the run's (admit).
    async fn gate(&self, verb: GateVerb, message: GateMessage) -> Result<GateTaken, ApiError> {
        // Coordinators send these for flows they run; anything else is no flow's limit.
        // Each of the three names goes into a stored key, so each is bounded here.
        let invalid = |message: String| Err(ApiError::new(ErrorCode::InvalidRequest, message));
        if !self.is_flow_name(&message.flow) {
            return invalid(format!(
                "flow: {:?} is no flow's name (at most {} bytes of letters, digits, `-` and `_`), so no flow's \
                 concurrency limit",
                cut(&message.flow),
                self.limits.name_bytes_max
            ));
        }
        if message.key.len() > CONCURRENCY_KEY_BYTES_MAX {
            return invalid(format!(
                "key is {} bytes, over the {CONCURRENCY_KEY_BYTES_MAX} a concurrency limit's key may have",
                message.key.len()
            ));
        }
        check_run_id("run_id", &message.run_id)?;
        // As a flow's definition may give them (a message names its limit's bounds).
        if message.max > CONCURRENCY_MAX {
            return invalid(format!("max must be at most {CONCURRENCY_MAX} (0: none), it is {}", message.max));
        }
        if let Some(rate) = message
            .rate
            .filter(|rate| !(1..=CONCURRENCY_MAX).contains(&rate.runs) || !(1..=DURATION_MS_MAX).contains(&rate.per_ms))
        {
            return invalid(format!(
                "rate must be 1 to {CONCURRENCY_MAX} runs per 1 to {DURATION_MS_MAX} ms, it is {} per {} ms",
                rate.runs, rate.per_ms
            ));
        }
        let shard = match verb {
            GateVerb::Acquire | GateVerb::Release => {
                self.router.shard_of(&gate_routing_key(&message.flow, &message.key))
            }
            GateVerb::Admit => self.router.shard_of(message.run_id.as_str()),
        };
        self.ask(shard, ShardRequest::Gate { verb, message }, |reply| match reply {
            ShardReply::GateTaken(taken) => Ok(taken),
            other => Err(other),
        })
        .await
    }

    /// The run a start with idempotency key `key` made, if there is one; an error when
    /// that cannot be told now (its shard unavailable: the caller tries again).
    async fn existing_run(&self, flow: &str, key: &str) -> Result<Option<RunStarted>, ApiError> {
        let run_id = RunId::from_idempotency_key(flow, key);
        match self.get_run(GetRun { run_id, without_data: true }).await {
            Ok(view) => {
                Ok(Some(RunStarted { run_id: view.run_id, flow: view.flow, version: view.version, created: false }))
            }
            Err(error) if error.code == ErrorCode::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn get_run(&self, request: GetRun) -> Result<flowgrid_engine::RunView, ApiError> {
        check_run_id("run_id", &request.run_id)?;
        let shard = self.router.shard_of(request.run_id.as_str());
        let get = ShardRequest::Get { run_id: request.run_id, without_data: request.without_data };
        self.ask(shard, get, |reply| match reply {
            ShardReply::Run(view) => Ok(*view),
            other => Err(other),
        })
        .await
    }

    async fn run_history(&self, request: GetRunHistory) -> Result<flowgrid_proto::RunHistory, ApiError> {
        let GetRunHistory { run_id, after, limit } = request;
        check_run_id("run_id", &run_id)?;
        let limit = match limit {
            None => HISTORY_PAGE_MAX,
            Some(limit) if (1..=HISTORY_PAGE_MAX).contains(&(limit as usize)) => limit as usize,
            Some(limit) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("limit is {limit}; ask for 1 to {HISTORY_PAGE_MAX} records, and page on with `after`"),
                ))
            }
        };
        let shard = self.router.shard_of(run_id.as_str());
        self.ask(shard, ShardRequest::History { run_id, after, limit }, |reply| match reply {
            ShardReply::History(history) => Ok(history),
            other => Err(other),
        })
        .await
    }

    async fn cancel_run(&self, request: CancelRun) -> Result<flowgrid_proto::RunCancelled, ApiError> {
        let CancelRun { run_id, reason } = request;
        check_run_id("run_id", &run_id)?;
        check_reason(&reason)?;
        let shard = self.router.shard_of(run_id.as_str());
        self.ask(shard, ShardRequest::Cancel { run_id, reason }, |reply| match reply {
            ShardReply::Cancelled(cancelled) => Ok(cancelled),
            other => Err(other),
        })
        .await
    }

    async fn redrive_run(&self, request: RedriveRun) -> Result<RunRedriven, ApiError> {
        check_run_id("run_id", &request.run_id)?;
        check_reason(&request.reason)?;
        if request.from.len() > self.limits.steps_max {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("`from` names {} steps; a flow has at most {}", request.from.len(), self.limits.steps_max),
            ));
        }
        let shard = self.router.shard_of(request.run_id.as_str());
        self.ask(shard, ShardRequest::Redrive(request), |reply| match reply {
            ShardReply::Redriven(redriven) => Ok(redriven),
            other => Err(other),
        })
        .await
    }

    async fn pause_run(&self, request: PauseRun, pause: bool) -> Result<RunPaused, ApiError> {
        check_run_id("run_id", &request.run_id)?;
        check_reason(&request.reason)?;
        let shard = self.router.shard_of(request.run_id.as_str());
        self.ask(shard, ShardRequest::Pause { request, pause }, |reply| match reply {
            ShardReply::Paused(paused) => Ok(paused),
            other => Err(other),
        })
        .await
    }

    async fn signal_run(
        &self,
        request: SignalRun,
        request_bytes: Option<usize>,
    ) -> Result<flowgrid_proto::RunSignalled, ApiError> {
        check_run_id("run_id", &request.run_id)?;
        check_payload(&self.limits, "signal data", &request.data, request_bytes)?;
        if let Some(id) = &request.id {
            if id.is_empty() || id.len() > SIGNAL_ID_BYTES_MAX || id.chars().any(char::is_control) {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("a signal's id must be 1 to {SIGNAL_ID_BYTES_MAX} bytes without control characters"),
                ));
            }
        }
        let shard = self.router.shard_of(request.run_id.as_str());
        self.ask(shard, ShardRequest::Signal(request), |reply| match reply {
            ShardReply::Signalled(signalled) => Ok(signalled),
            other => Err(other),
        })
        .await
    }

    /// Whether `flow` could name a flow: a name within the bytes a name may have.
    fn is_flow_name(&self, flow: &str) -> bool {
        flowgrid_model::is_name(flow) && flow.len() <= self.limits.name_bytes_max
    }

    /// Refuses a list's flow filter that no flow could match (and that every shard would
    /// be handed).
    fn check_flow_filter(&self, flow: Option<&str>) -> Result<(), ApiError> {
        match flow {
            Some(flow) if !self.is_flow_name(flow) => Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "flow: {:?} is no flow's name (at most {} bytes of letters, digits, `-` and `_`)",
                    cut(flow),
                    self.limits.name_bytes_max
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Every shard's limits in use, by flow and key; past [`LimitList::LIMITS_MAX`], the
    /// busiest.
    async fn list_limits(&self, request: ListLimits) -> Result<LimitList, ApiError> {
        self.check_flow_filter(request.flow.as_deref())?;
        let query = ShardRequest::Limits { flow: request.flow };
        let pick = |reply| match reply {
            ShardReply::Limits(limits) => Ok(vec![LimitsPage { limits, more: 0 }]),
            // A shard with more than a listing holds sends its busiest, counting the others.
            ShardReply::LimitsPage(page) => Ok(vec![page]),
            other => Err(other),
        };
        let pages = self.ask_all(query, pick, merge_limits_pages).await?;
        let LimitsPage { mut limits, more } = pages.into_iter().next().unwrap_or_default();
        limits.sort_by(|left, right| (&left.flow, &left.key).cmp(&(&right.flow, &right.key)));
        Ok(LimitList { limits, more: u32::try_from(more).unwrap_or(u32::MAX) })
    }

    /// Newest first over every shard: each shard gives its newest matching runs older than
    /// the cursor, and the merge keeps the newest `limit` that fit a reply in `encoding`.
    async fn list_runs(&self, request: ListRuns, encoding: Encoding) -> Result<RunList, ApiError> {
        let limit = page_limit(request.limit, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX)?;
        // The query goes to every shard: nothing in it may be larger than what it can match.
        self.check_flow_filter(request.flow.as_deref())?;
        let invalid = |message: String| Err(ApiError::new(ErrorCode::InvalidRequest, message));
        if let Err(why) = flowgrid_model::check_labels(&request.labels) {
            return invalid(format!("labels: {why}"));
        }
        if let Some(parent) = &request.parent {
            check_run_id("parent", parent)?;
        }
        if let Some(cursor) = request.cursor.as_ref().filter(|cursor| cursor.len() > CURSOR_BYTES_MAX) {
            return invalid(format!(
                "cursor is {} bytes, longer than any cursor the grid gives; pass the `next_cursor` of the previous page",
                cursor.len()
            ));
        }
        if let (Some(since_ms), Some(until_ms)) = (request.since_ms, request.until_ms) {
            if since_ms >= until_ms {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "since_ms ({}) must be before until_ms ({}): the window holds no time",
                        flowgrid_model::utc_time(since_ms, true),
                        flowgrid_model::utc_time(until_ms, true)
                    ),
                ));
            }
        }
        let query = ShardRequest::List { query: request, limit: limit + 1 };
        let pick = |reply| match reply {
            ShardReply::Runs(runs) => Ok(vec![RunsPage { runs, scanned_to: None }]),
            ShardReply::RunsPage(page) => Ok(vec![page]),
            other => Err(other),
        };
        let pages = self.ask_all(query, pick, |pages| merge_runs_pages(pages, limit)).await?;
        Ok(run_list(pages.into_iter().next().unwrap_or_default(), limit, encoding))
    }
}

/// The busiest limits first: most runs queued, then most going, then by flow and key.
fn busiest_first(left: &LimitSummary, right: &LimitSummary) -> std::cmp::Ordering {
    (right.queued, right.going)
        .cmp(&(left.queued, left.going))
        .then_with(|| (&left.flow, &left.key).cmp(&(&right.flow, &right.key)))
}

/// Keeps the [`LimitList::LIMITS_MAX`] busiest of `limits` (in no order) and returns how
/// many it left out: gathered from every shard, a listing holds at most that and one
/// shard's answer, however many limits the grid has; a shard's answer holds at most that
/// too (see [`crate::routing::LimitsPage`]).
pub(crate) fn keep_busiest(limits: &mut Vec<LimitSummary>) -> usize {
    let kept = LimitList::LIMITS_MAX;
    if limits.len() <= kept {
        return 0;
    }
    limits.select_nth_unstable_by(kept, busiest_first);
    let left_out = limits.len() - kept;
    limits.truncate(kept);
    left_out
}

/// The shards' parts of a limit listing so far as one: the busiest of their limits, and
/// every limit left out, by a shard or here, counted.
fn merge_limits_pages(pages: &mut Vec<LimitsPage>) {
    let mut merged = LimitsPage::default();
    for page in pages.drain(..) {
        merged.limits.extend(page.limits);
        merged.more = merged.more.saturating_add(page.more);
    }
    merged.more = merged.more.saturating_add(keep_busiest(&mut merged.limits) as u64);
    pages.push(merged);
}

/// Newest first: by creation time, then run id.
fn newest_first(left: &RunSummary, right: &RunSummary) -> std::cmp::Ordering {
    (right.created_ms, &right.run_id).cmp(&(left.created_ms, &left.run_id))
}

/// The shards' pages of a listing so far as one: their runs, and the newest of their stop
/// points (everything newer was looked at on every shard); past twice a page, only the
/// newest `limit` runs and one more (to tell whether more follow).
fn merge_runs_pages(pages: &mut Vec<RunsPage>, limit: usize) {
    let Some(mut merged) = pages.pop() else { return };
    for page in pages.drain(..) {
        merged.runs.extend(page.runs);
        merged.scanned_to = merged.scanned_to.max(page.scanned_to);
    }
    if merged.runs.len() > 2 * (limit + 1) {
        merged.runs.sort_by(newest_first);
        merged.runs.truncate(limit + 1);
    }
    pages.push(merged);
}

/// The page of a listing from the shards' pages merged: the newest `limit` runs within
/// [`RunsPage::BYTES_MAX`] bytes of them in `encoding` (the reply's), and the cursor the
/// next page goes on from.
///
/// Past a stop point some shard did not look: the page ends there. The run at the stop
/// point itself was looked at (a shard stops at the last entry it read, or at the last run
/// it sent), so it is on this page, and the next one reads what is older.
fn run_list(page: RunsPage, limit: usize, encoding: Encoding) -> RunList {
    let RunsPage { mut runs, scanned_to } = page;
    runs.sort_by(newest_first);
    if let Some((created_ms, run_id)) = &scanned_to {
        runs.retain(|run| (run.created_ms, &run.run_id) >= (*created_ms, run_id));
    }
    let more = runs.len() > limit;
    runs.truncate(limit);
    // A page its bytes end stops at its last run: the next page goes on after it.
    let mut page = RunsPage { runs, scanned_to };
    page.end_within_bytes(encoding);
    let RunsPage { runs, scanned_to } = page;
    let next_cursor = match (more, scanned_to) {
        (true, _) => runs.last().map(crate::shard::cursor_of),
        (false, Some((created_ms, run_id))) => Some(crate::shard::cursor(created_ms, &run_id)),
        (false, None) => None,
    };
    RunList { runs, next_cursor }
}

/// Bytes of a `run.start_many` reply up to which it holds its refusals whole. Past them
/// each further refusal comes without its issues and with its message cut: 1,000 refusals
/// with their issues (each up to 10 of about 512 bytes) would make a reply larger than NATS
/// takes (1 MiB by default), refused as too large after its good runs were started, so
/// that their callers would never learn their ids.
const START_MANY_REPLY_BYTES_WHOLE: usize = 512 * 1024;

/// Bytes an outcome of a `run.start_many` reply takes besides its text, about: field names,
/// an error code, a version, flags.
const OUTCOME_BYTES_BESIDES_TEXT: usize = 64;

/// Shortens the refusals among `results` that come after [`START_MANY_REPLY_BYTES_WHOLE`]
/// bytes of the reply (in `encoding`): their issues are left out, saying how many, and
/// their messages are cut. A started run's outcome is never changed.
fn fit_outcomes(results: &mut [Reply<RunStarted>], encoding: Encoding) {
    let encoded_len = |refusal: &ApiError| flowgrid_proto::encode(encoding, refusal).map_or(0, |bytes| bytes.len());
    let mut bytes = 0usize;
    for result in results {
        let size = match result {
            Reply::Ok(started) => started.run_id.as_str().len() + started.flow.len() + OUTCOME_BYTES_BESIDES_TEXT,
            Reply::Error(refusal) => {
                let size = encoded_len(refusal) + OUTCOME_BYTES_BESIDES_TEXT;
                if bytes.saturating_add(size) <= START_MANY_REPLY_BYTES_WHOLE {
                    size
                } else {
                    shorten(refusal);
                    encoded_len(refusal) + OUTCOME_BYTES_BESIDES_TEXT
                }
            }
        };
        bytes = bytes.saturating_add(size);
    }
}

/// A refusal without its issues and with its message cut, as a large reply holds it.
fn shorten(refusal: &mut ApiError) {
    let issues = std::mem::take(&mut refusal.issues).len();
    let mut message = cut(&refusal.message);
    if issues > 0 {
        message.push_str(&format!(
            " ({issues} issues left out: the reply to all the starts would be too large; start this run alone to see \
             them)"
        ));
    }
    refusal.message = message;
}

/// The refusal of a definition, with each of its problems.
fn definition_refused(error: flowgrid_model::DefinitionError) -> ApiError {
    let mut refusal = ApiError::new(ErrorCode::InvalidDefinition, error.to_string());
    refusal.issues = error.issues();
    refusal
}

/// Refuses an input that does not match the flow's `input_schema`, with each problem.
fn check_input(plan: &FlowPlan, schema: &InputSchema, input: &serde_json::Value) -> Result<(), ApiError> {
    let issues = schema.check(input, "input");
    if issues.is_empty() {
        return Ok(());
    }
    let mut refusal = ApiError::new(
        ErrorCode::InvalidRequest,
        format!("the input does not match the input_schema of flow `{}` (version {})", plan.name, plan.version),
    );
    refusal.issues = issues;
    Err(refusal)
}

/// Decodes the request, runs `handler`, encodes the reply.
async fn call<Request, Response, Handler, Pending>(
    encoding: Encoding,
    payload: &[u8],
    handler: Handler,
) -> (Vec<u8>, bool)
where
    Request: DeserializeOwned,
    Response: Serialize,
    Handler: FnOnce(Request) -> Pending,
    Pending: std::future::Future<Output = Result<Response, ApiError>>,
{
    let outcome = match flowgrid_proto::decode::<Request>(encoding, payload) {
        Ok(request) => handler(request).await,
        Err(error) => Err(ApiError::new(ErrorCode::InvalidRequest, error.to_string())),
    };
    respond(encoding, outcome)
}

fn respond<T: Serialize>(encoding: Encoding, outcome: Result<T, ApiError>) -> (Vec<u8>, bool) {
    let succeeded = outcome.is_ok();
    let reply = Reply::from(outcome);
    let bytes = flowgrid_proto::encode(encoding, &reply).unwrap_or_else(|error| {
        warn!(error = %error, "cannot encode a reply");
        let fallback = Reply::<()>::Error(ApiError::new(ErrorCode::Internal, "the reply could not be encoded"));
        flowgrid_proto::encode(encoding, &fallback).unwrap_or_default()
    });
    (bytes, succeeded)
}

async fn send_reply<T: Serialize>(
    nats: &async_nats::Client,
    reply_to: async_nats::Subject,
    encoding: Encoding,
    reply: &Reply<T>,
) {
    if let Ok(bytes) = flowgrid_proto::encode(encoding, reply) {
        publish(nats, reply_to, encoding, bytes).await;
    }
}

/// The headers of a message in `encoding`: its content type, for JSON.
pub(crate) fn content_headers(encoding: Encoding) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(content_type) = encoding.content_type() {
        headers.insert(flowgrid_proto::CONTENT_TYPE_HEADER, content_type);
    }
    headers
}

pub(crate) async fn publish(
    nats: &async_nats::Client,
    reply_to: async_nats::Subject,
    encoding: Encoding,
    bytes: Vec<u8>,
) {
    let headers = content_headers(encoding);
    // A reply NATS would refuse (a run's view holds its input and every step's output) is
    // a refusal the caller can read, not a request that times out.
    let bytes = match flowgrid_proto::check_fits_server("the reply", bytes.len(), || nats.server_info().max_payload) {
        Ok(()) => bytes,
        Err(refusal) => {
            // The caller is told; a page that reloads would repeat a warning every few seconds.
            debug!(reply = %refusal.message, "an API reply is too large for NATS; refused instead");
            flowgrid_proto::encode(encoding, &Reply::<()>::Error(refusal)).unwrap_or_default()
        }
    };
    if let Err(error) = nats.publish_with_headers(reply_to, headers, Bytes::from(bytes)).await {
        debug!(error = %error, "cannot send an API reply");
    }
}

/// The size of a MessagePack request, which bounds the encoded size of any value in it
/// (the value's bytes are a slice of the request, and encoded again it grows at most by
/// [`MSGPACK_GROWTH`]); `None` for JSON, whose size does not.
pub fn msgpack_request_bytes(encoding: Encoding, payload: &[u8]) -> Option<usize> {
    (encoding == Encoding::MsgPack).then_some(payload.len())
}

/// How much a value read from MessagePack may grow when it is encoded again, as the grid
/// stores it, as a fraction: a 32-bit float (5 bytes) is read as a 64-bit one and written
/// back in 9; everything else is written back in at most the bytes it came in (integers and
/// lengths in their shortest form, repeated keys once).
const MSGPACK_GROWTH: (usize, usize) = (9, 5);

/// Refuses a run input or signal data (`what`) over the payload limit or nested too deep,
/// before anything changes. The value's MessagePack bytes are counted ([`msgpack_bytes`],
/// without writing them anywhere) unless the request's size (`request_bytes`, see
/// [`msgpack_request_bytes`]) keeps it within the limit even at its largest growth: a
/// request of 1,000,000 bytes of 32-bit floats holds a value of 1.8 MB.
fn check_payload(
    limits: &Limits,
    what: &str,
    value: &serde_json::Value,
    request_bytes: Option<usize>,
) -> Result<(), ApiError> {
    let depth = nesting_depth(value);
    if depth > limits.nesting_depth_max {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the {what} is nested {depth} levels deep, over the limit of {}", limits.nesting_depth_max),
        ));
    }
    let (grown, of) = MSGPACK_GROWTH;
    if request_bytes.is_some_and(|bytes| bytes.saturating_mul(grown) / of <= limits.payload_bytes_max) {
        return Ok(());
    }
    let size = msgpack_bytes(value);
    if size > limits.payload_bytes_max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the {what} is {size} bytes, over the limit of {} bytes; pass a reference to large data instead",
                limits.payload_bytes_max
            ),
        ));
    }
    Ok(())
}

/// A listing's page size: `asked`, or `default` when the request gives none; refused
/// outside 1 to `max`.
fn page_limit(asked: Option<u32>, default: u32, max: u32) -> Result<usize, ApiError> {
    match asked.unwrap_or(default) {
        limit @ 1.. if limit <= max => Ok(limit as usize),
        limit => Err(ApiError::new(ErrorCode::InvalidRequest, format!("limit must be 1 to {max}, it is {limit}"))),
    }
}

/// A reason (of a cancel, redrive, pause or resume) is kept in the run's history: refused
/// past [`REASON_BYTES_MAX`].
fn check_reason(reason: &str) -> Result<(), ApiError> {
    if reason.len() <= REASON_BYTES_MAX {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidRequest,
        format!("the reason is {} bytes; at most {REASON_BYTES_MAX} are kept with a run: shorten it", reason.len()),
    ))
}

/// Refuses a run id (in the request's field `field`) that no run of the grid could have:
/// empty, or over [`RUN_ID_BYTES_MAX`] bytes. Looked up, such an id would make a key the
/// store may refuse (an error the caller would retry for ever), and a `not_found` that
/// echoes it whole.
fn check_run_id(field: &str, run_id: &RunId) -> Result<(), ApiError> {
    let bytes = run_id.as_str().len();
    if (1..=RUN_ID_BYTES_MAX).contains(&bytes) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidRequest,
        format!(
            "{field}: a run id has 1 to {RUN_ID_BYTES_MAX} bytes, this one {bytes}; pass the `run_id` the grid gave \
             the run when it started"
        ),
    ))
}

/// Refuses a child run's end that the grid would not send, before the parent's shard sees
/// it: run ids no run has, an end larger than the one a child's shard passes on (its
/// payload limit and room for the end's own fields: [`flowgrid_proto::max_payload_needed`]),
/// or an error with a blank code, which no retry policy or catch could match (a worker's
/// becomes `invalid_output`, a `fail` step's is refused at deploy).
///
/// The rest of a worker's rules is not applied: the grid sends such ends itself, and one
/// refused here would be sent again for ever while the parent waits. A `fail` step's code
/// may be longer than a worker's or hold control characters; and a run's output nests a
/// level below its steps' outputs (`{step id: output}`), an `output` expression's up to
/// [`flowgrid_model::expr::VALUE_DEPTH_MAX`] levels.
fn check_child_end(limits: &Limits, ended: &ChildRunEnded) -> Result<(), ApiError> {
    check_run_id("parent", &ended.parent)?;
    check_run_id("child", &ended.child)?;
    let code_problem = ended.error.as_ref().and_then(|error| limits.error_code_problem(&error.code));
    if code_problem == Some(ErrorCodeProblem::Blank) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "error.code is empty; a child's end carries the code its run failed with, which catches and retry \
             policies match",
        ));
    }
    let bytes_max = flowgrid_proto::max_payload_needed(limits.payload_bytes_max);
    let bytes = msgpack_bytes(ended);
    if bytes > bytes_max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the child's end is {bytes} bytes as MessagePack, over the {bytes_max} a child's end may have (the \
                 payload limit of {} bytes and room for its fields)",
                limits.payload_bytes_max
            ),
        ));
    }
    Ok(())
}

/// The refusal of a definition whose trigger has a problem at `path`.
fn trigger_refusal(path: &str, message: String) -> ApiError {
    let mut refusal = ApiError::new(ErrorCode::InvalidDefinition, format!("invalid definition: {path}: {message}"));
    refusal.issues = vec![flowgrid_model::Issue { path: path.to_owned(), message }];
    refusal
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended_run(created_ms: u64, run_id: &str) -> RunSummary {
        RunSummary {
            run_id: RunId(run_id.into()),
            flow: "rare".to_owned(),
            version: 1,
            status: flowgrid_engine::RunStatus::Succeeded,
            created_ms,
            ended_ms: Some(created_ms + 1),
            parent: None,
            paused: false,
            queued: false,
            delayed: false,
            labels: Default::default(),
        }
    }

    fn ids(list: &RunList) -> Vec<&str> {
        list.runs.iter().map(|run| run.run_id.as_str()).collect()
    }

    /// A shard whose scan stopped at the entry it read last (its only match): the run is on
    /// the page, and the next page goes on with the older ones.
    #[test]
    fn the_run_a_shard_s_scan_stopped_at_is_on_the_page() {
        let rare = ended_run(1_000, "r-oldest");
        let page = RunsPage { runs: vec![rare.clone()], scanned_to: Some((1_000, rare.run_id.clone())) };
        let list = run_list(page, 50, Encoding::MsgPack);
        assert_eq!(ids(&list), ["r-oldest"]);
        assert_eq!(list.next_cursor, Some(crate::shard::cursor(1_000, &rare.run_id)));
    }

    /// Merged, the page ends at the newest stop point: a shard that stopped there holds its
    /// run at it; another shard's older runs wait for the next page.
    #[test]
    fn pages_merged_end_at_the_newest_stop_point_and_keep_the_run_at_it() {
        let stopped = RunsPage {
            runs: vec![ended_run(100, "a-1"), ended_run(50, "a-2")],
            scanned_to: Some((50, RunId("a-2".into()))),
        };
        let whole = RunsPage { runs: vec![ended_run(80, "b-1"), ended_run(30, "b-2")], scanned_to: None };
        let mut pages = Vec::new();
        for page in [stopped, whole] {
            pages.push(page);
            merge_runs_pages(&mut pages, 50);
        }
        assert_eq!(pages.len(), 1);
        let list = run_list(pages.pop().unwrap(), 50, Encoding::MsgPack);
        assert_eq!(ids(&list), ["a-1", "b-1", "a-2"]);
        assert_eq!(list.next_cursor.as_deref(), Some("50.a-2"), "b-2 comes on the next page");
        // A full page ends at its last run, newer than the stop point.
        let page = RunsPage {
            runs: vec![ended_run(100, "a-1"), ended_run(80, "b-1"), ended_run(50, "a-2")],
            scanned_to: Some((50, RunId("a-2".into()))),
        };
        let list = run_list(page, 2, Encoding::MsgPack);
        assert_eq!((ids(&list), list.next_cursor.as_deref()), (vec!["a-1", "b-1"], Some("80.b-1")));
    }

    /// An ended run with 16 labels of the largest size, whose values JSON escapes: about
    /// 5.3 KB of MessagePack, 25 KB of JSON.
    fn labelled_run(created_ms: u64, run_id: &str) -> RunSummary {
        let labels = (0..flowgrid_model::labels::LABELS_MAX)
            .map(|n| (format!("{n:0>64}"), "\u{1}".repeat(flowgrid_model::labels::LABEL_VALUE_BYTES_MAX)))
            .collect();
        RunSummary { labels, ..ended_run(created_ms, run_id) }
    }

    /// 300 runs with large labels on two shards, listed 1,000 at a time as JSON: each reply
    /// stays within half a MiB of runs (7.7 MB whole, it would be refused), and the pages
    /// list every run once, newest first.
    #[test]
    fn a_run_listing_pages_by_bytes_and_lists_every_run_once() {
        let shards: [Vec<RunSummary>; 2] = [0, 1]
            .map(|shard| (0..150).rev().map(|n| labelled_run(2 * n + shard, &format!("s{shard}-{n:03}"))).collect());
        let limit = 1_000;
        let mut cursor: Option<String> = None;
        let mut listed = Vec::new();
        for _ in 0..300 {
            let mut pages = Vec::new();
            for runs in &shards {
                // What a shard answers: its runs older than the cursor, `limit + 1` at most.
                let older = |run: &&RunSummary| {
                    let after = cursor.as_deref().and_then(|cursor| cursor.split_once('.'));
                    after.is_none_or(|(created_ms, run_id)| {
                        (run.created_ms, run.run_id.as_str()) < (created_ms.parse().unwrap(), run_id)
                    })
                };
                let mut page =
                    RunsPage { runs: runs.iter().filter(older).take(limit + 1).cloned().collect(), scanned_to: None };
                page.end_within_bytes(Encoding::MsgPack);
                pages.push(page);
                merge_runs_pages(&mut pages, limit);
            }
            let list = run_list(pages.pop().unwrap(), limit, Encoding::Json);
            let reply = flowgrid_proto::encode(Encoding::Json, &Reply::Ok(list.clone())).unwrap();
            assert!(reply.len() <= RunsPage::BYTES_MAX + 1_024, "a reply of {} bytes", reply.len());
            assert!(!list.runs.is_empty(), "a page after {cursor:?} is empty");
            listed.extend(list.runs.iter().map(|run| run.created_ms));
            cursor = list.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(listed, (0..300).rev().collect::<Vec<u64>>(), "each run once, newest first");
    }

    /// MessagePack of `count` 32-bit floats in one array: 5 bytes each, 9 once re-encoded.
    fn float32_array(count: u32) -> Vec<u8> {
        let mut bytes = vec![0xdd];
        bytes.extend(count.to_be_bytes());
        for index in 0..count {
            bytes.push(0xca);
            bytes.extend((index as f32 + 0.5).to_be_bytes());
        }
        bytes
    }

    #[test]
    fn an_input_that_grows_past_the_limit_when_re_encoded_is_refused() {
        let limits = Limits::default();
        let request = float32_array(200_000);
        assert!(request.len() <= limits.payload_bytes_max, "the request itself is within the limit");
        let input: serde_json::Value = rmp_serde::from_slice(&request).unwrap();
        let refusal = check_payload(&limits, "input", &input, Some(request.len())).expect_err("1.8 MB re-encoded");
        assert_eq!(refusal.code, ErrorCode::PayloadTooLarge, "{refusal:?}");
        assert!(refusal.message.contains("is 1800005 bytes"), "{refusal:?}");
        // A request small enough that no growth takes its values past the limit.
        let request = float32_array(100_000);
        let input: serde_json::Value = rmp_serde::from_slice(&request).unwrap();
        assert!(check_payload(&limits, "input", &input, Some(request.len())).is_ok());
    }

    fn child_end(output: serde_json::Value, error: Option<flowgrid_engine::TaskError>) -> ChildRunEnded {
        ChildRunEnded {
            parent: RunId::from_parts(1, 2),
            step: "invoke".to_owned(),
            item: None,
            child: RunId::from_parts(1, 3),
            status: flowgrid_engine::RunStatus::Succeeded,
            output: Some(output),
            error,
            refused: false,
        }
    }

    /// A child's end as large as its shard passes on (the payload limit and 1 KiB), with
    /// an output deeper than a worker's and an error code a worker's could not be, is
    /// taken: the grid sends such ends. One past the bound, or with a blank code, is not.
    #[test]
    fn a_child_end_the_grid_sends_is_taken_and_one_it_would_not_is_refused() {
        let limits = Limits::default();
        let deep = (0..limits.nesting_depth_max + 8).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
        let long_code = flowgrid_engine::TaskError { code: "x".repeat(300), message: String::new(), retryable: false };
        assert!(check_child_end(&limits, &child_end(deep, Some(long_code))).is_ok());
        let at_the_bound = child_end(serde_json::json!("x".repeat(limits.payload_bytes_max + 1_000)), None);
        assert!(check_child_end(&limits, &at_the_bound).is_ok(), "{} bytes", msgpack_bytes(&at_the_bound));

        let over = child_end(serde_json::json!("x".repeat(limits.payload_bytes_max + 2_048)), None);
        let refusal = check_child_end(&limits, &over).expect_err("over the bound");
        assert_eq!(refusal.code, ErrorCode::PayloadTooLarge, "{refusal:?}");
        let blank = flowgrid_engine::TaskError { code: " ".to_owned(), message: String::new(), retryable: false };
        let refusal = check_child_end(&limits, &child_end(serde_json::json!(null), Some(blank))).expect_err("blank");
        assert!(refusal.code == ErrorCode::InvalidRequest && refusal.message.starts_with("error.code"), "{refusal:?}");
    }

    #[test]
    fn a_run_id_is_one_to_64_bytes() {
        assert!(check_run_id("run_id", &RunId("r".repeat(RUN_ID_BYTES_MAX).into())).is_ok());
        for bytes in [0, RUN_ID_BYTES_MAX + 1] {
            let refusal = check_run_id("run_id", &RunId("r".repeat(bytes).into())).expect_err("refused");
            assert_eq!((refusal.code, refusal.retryable), (ErrorCode::InvalidRequest, false), "{refusal:?}");
            assert!(refusal.message.starts_with("run_id: "), "{refusal:?}");
        }
    }

    /// A request still being handled when the stop's wait runs out (its command queued in
    /// a shard that answers later) is answered, not aborted.
    #[tokio::test(start_paused = true)]
    async fn a_request_still_handled_at_the_end_of_a_stop_is_answered() {
        let (shard_answers, shard_answer) = tokio::sync::oneshot::channel::<()>();
        let (reply_sent, reply) = tokio::sync::oneshot::channel();
        let mut handlers = tokio::task::JoinSet::new();
        handlers.spawn(async move {
            let answered = shard_answer.await.is_ok();
            let _ = reply_sent.send(answered);
        });
        // The clock is paused: the wait runs out as soon as nothing else can go on.
        answer_taken(handlers).await;
        let _ = shard_answers.send(());
        assert_eq!(reply.await, Ok(true), "the handler answered its caller after the wait");
    }

    /// A fan-out past the bound is refused and counted as an overload refusal (the overload
    /// alert watches the count); one that finds the coordinator stopping is not.
    #[test]
    fn a_fan_out_past_the_bound_is_refused_not_queued() {
        let recording = crate::metrics::testing::Recording::new();
        recording.record(|| {
            let fan_outs = Semaphore::new(FAN_OUTS_MAX);
            let held: Vec<_> =
                (0..FAN_OUTS_MAX).map(|_| fan_out_permit(&fan_outs).expect("within the bound")).collect();
            let refusal = fan_out_permit(&fan_outs).expect_err("past the bound");
            assert_eq!((refusal.code, refusal.retryable), (ErrorCode::Overloaded, true), "{refusal:?}");
            assert!(refusal.message.contains(&format!("serving {FAN_OUTS_MAX} requests")), "{refusal:?}");
            drop(held);
            assert!(fan_out_permit(&fan_outs).is_ok(), "a permit given back serves the next");
            fan_outs.close();
            assert_eq!(fan_out_permit(&fan_outs).map(drop).unwrap_err().code, ErrorCode::Unavailable);
        });
        let rejected = recording.sample("flowgrid_api_rejected_total ");
        assert_eq!(rejected, Some(1.0), "{}", recording.render());
    }

    fn limit_in_use(number: usize) -> LimitSummary {
        LimitSummary {
            flow: format!("flow-{}", number % 3),
            key: format!("customer-{number}"),
            max: 4,
            rate: None,
            when_full: Default::default(),
            // Many ties, so that the order by flow and key decides too.
            going: (number * 7_919 % 5) as u32,
            queued: (number * 104_729 % 11) as u32,
            next_start_ms: None,
        }
    }

    #[test]
    fn a_limit_listing_holds_the_busiest_and_counts_the_others() {
        const SHARDS: usize = 64;
        const PER_SHARD: usize = 700;
        let answers: Vec<Vec<LimitSummary>> = (0..SHARDS)
            .map(|shard| (0..PER_SHARD).map(|index| limit_in_use(shard * PER_SHARD + index)).collect())
            .collect();
        let mut everything = answers.concat();
        everything.sort_by(busiest_first);
        everything.truncate(LimitList::LIMITS_MAX);

        let (mut held, mut left_out) = (Vec::new(), 0);
        for answer in answers {
            held.extend(answer);
            left_out += keep_busiest(&mut held);
            assert!(held.len() <= LimitList::LIMITS_MAX, "{} held after an answer", held.len());
        }
        held.sort_by(busiest_first);
        assert!(held == everything, "the busiest of all, as if every limit had been sorted");
        assert_eq!(left_out, SHARDS * PER_SHARD - LimitList::LIMITS_MAX);
    }

    /// What the shards left out of their answers counts with what the gathering leaves out.
    #[test]
    fn a_limit_listing_counts_what_each_shard_left_out() {
        const SHARDS: usize = 3;
        const PER_SHARD: usize = 600;
        let mut pages = Vec::new();
        for shard in 0..SHARDS {
            let limits = (0..PER_SHARD).map(|index| limit_in_use(shard * PER_SHARD + index)).collect();
            pages.push(LimitsPage { limits, more: 4_000 });
            merge_limits_pages(&mut pages);
        }
        let [page] = &pages[..] else { panic!("one page gathered, not {}", pages.len()) };
        assert_eq!(page.limits.len(), LimitList::LIMITS_MAX);
        assert_eq!(page.more as usize, SHARDS * 4_000 + SHARDS * PER_SHARD - LimitList::LIMITS_MAX);
    }
}
