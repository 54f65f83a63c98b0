//! Routing a request to the owner of its shard, wherever that is.
//!
//! A shard this coordinator serves is asked directly (its actor's inbox). Any other shard
//! is asked over NATS on `<prefix>.shard.<n>.cmd`, where only its owner listens
//! ([`serve_shard_commands`]). While a shard moves nobody listens for a moment: the router
//! waits and asks again for up to [`MOVE_WAIT`], then answers `unavailable` (retryable),
//! which the SDK and the CLI retry by themselves.
//!
//! A coordinator that lost a shard without handing it over (its lease ran out) may still
//! listen on the shard's subject for a moment beside the new owner, so that both take a
//! request. It sends no refusal that says to ask again then ([`Serving`]); the router sends
//! a start again as idempotent and takes the owner's answer to any of its tries
//! ([`Router::call`]); and the owner runs a start asked again after its first try
//! ([`StartsInFlight`]): a request asked again is not applied twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgrid_engine::RunView;
use flowgrid_model::{shard_of, FlowDefinition, FlowPlan, Labels, ParentRef, RunId, ShardId};
use flowgrid_proto::{
    ApiError, ChildEndTaken, ChildRunEnded, Encoding, ErrorCode, FlowDeployed, FlowInfo, FlowSummary, GateMessage,
    GateTaken, LimitSummary, ListRuns, PauseRun, RedriveRun, Reply, RunCancelled, RunPaused, RunRedriven, RunSignalled,
    RunStarted, RunSummary, SignalRun,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use crate::cluster::Lease;
use crate::shard::{maybe_applied, Command, FlowsPage, GateVerb, NodeContext, RunsPage, ShardHandle, StartCommand};

/// How long a request waits for a shard that nobody serves (it is moving) before it is
/// answered `unavailable`.
pub const MOVE_WAIT: Duration = Duration::from_secs(3);
/// How long a forwarded request waits for the owner's answer (a paused owner never
/// answers; the caller's retry then finds the next one).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// First and largest pause between two tries to reach a moving shard.
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(10);
const RETRY_DELAY_MAX: Duration = Duration::from_millis(200);

/// A request for one shard, as forwarded between coordinators (MessagePack).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardRequest {
    /// Starts a run of an exact flow version (the caller resolved "latest").
    Start {
        run_id: RunId,
        flow: String,
        version: u32,
        input: Value,
        idempotent: bool,
        /// Set for the child run of a subflow step.
        #[serde(default)]
        parent: Option<ParentRef>,
        #[serde(default, skip_serializing_if = "Labels::is_empty")]
        labels: Labels,
        /// A later start time: the run waits, delayed, until then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_at: Option<flowgrid_model::Millis>,
    },
    Cancel {
        run_id: RunId,
        reason: String,
    },
    Redrive(RedriveRun),
    /// Pause (`pause`) or resume the run.
    Pause {
        request: PauseRun,
        pause: bool,
    },
    Signal(SignalRun),
    Get {
        run_id: RunId,
        /// Leave the run's data out where the view is made, so that a view too large for
        /// one message crosses between coordinators without it too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        without_data: bool,
    },
    History {
        run_id: RunId,
        after: Option<u64>,
        limit: usize,
    },
    List {
        query: ListRuns,
        limit: usize,
    },
    Deploy {
        definition: Box<FlowDefinition>,
    },
    /// Pause (`pause`) or resume the flow's schedule and trigger.
    PauseFlow {
        request: flowgrid_proto::PauseFlow,
        pause: bool,
    },
    GetFlow {
        name: String,
        version: Option<u32>,
    },
    /// Every flow (what older coordinators ask).
    ListFlows,
    /// The flows named after `after`, a page of at most `limit`.
    FlowsPage {
        after: Option<String>,
        limit: usize,
    },
    /// A child run's end, for its parent run's shard.
    ChildEnded(ChildRunEnded),
    /// A message about a run's place under a concurrency limit, for the limit's shard
    /// (acquire, release) or the run's (admit).
    Gate {
        verb: GateVerb,
        message: GateMessage,
    },
    /// The concurrency limits the shard keeps (of one flow, or all).
    Limits {
        flow: Option<String>,
    },
}

impl ShardRequest {
    /// The request as sent again after a refusal that says to ask again: a start goes as
    /// idempotent, since a coordinator that lost the shard may have refused it while the
    /// shard's owner took it too and started the run (one that ended in that commit is no
    /// longer in the owner's memory: only the store says it exists).
    fn sent_again(mut self) -> ShardRequest {
        if let ShardRequest::Start { idempotent, .. } = &mut self {
            *idempotent = true;
        }
        self
    }
}

/// The answer to a [`ShardRequest`], one variant per request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardReply {
    Started(RunStarted),
    Cancelled(RunCancelled),
    Redriven(RunRedriven),
    Paused(RunPaused),
    FlowPaused(flowgrid_proto::FlowPaused),
    Signalled(RunSignalled),
    Run(Box<RunView>),
    History(flowgrid_proto::RunHistory),
    Runs(Vec<RunSummary>),
    /// A listing whose scan stopped before it found enough matches.
    RunsPage(RunsPage),
    Deployed(FlowDeployed),
    Flow(Box<FlowInfo>),
    Flows(Vec<FlowSummary>),
    FlowsPage(FlowsPage),
    ChildEndTaken(ChildEndTaken),
    GateTaken(GateTaken),
    /// Every limit of the shard in use: what it answers when it keeps no more than a
    /// listing holds (what every version answers).
    Limits(Vec<LimitSummary>),
    /// The busiest limits of a shard that keeps more than a listing holds, and how many it
    /// left out.
    LimitsPage(LimitsPage),
}

/// One shard's part of a `limit.list`: its [`LimitList::LIMITS_MAX`] busiest limits in use
/// at most, so that the reply crosses between coordinators within NATS's payload limit
/// however many limits the shard keeps.
///
/// [`LimitList::LIMITS_MAX`]: flowgrid_proto::LimitList::LIMITS_MAX
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitsPage {
    /// In no order.
    pub limits: Vec<LimitSummary>,
    /// Limits in use left out of `limits`.
    #[serde(default)]
    pub more: u64,
}

/// The reply of a shard whose limits in use are `limits`: all of them when a listing holds
/// them, else the busiest, counting the others.
fn limits_reply(mut limits: Vec<LimitSummary>) -> ShardReply {
    match crate::api::keep_busiest(&mut limits) {
        0 => ShardReply::Limits(limits),
        left_out => ShardReply::LimitsPage(LimitsPage { limits, more: left_out as u64 }),
    }
}

/// The shards this coordinator serves right now, by shard number.
pub struct ShardTable {
    slots: RwLock<Vec<Option<ShardHandle>>>,
}

impl ShardTable {
    pub fn new(shards: u32) -> ShardTable {
        ShardTable { slots: RwLock::new(vec![None; shards as usize]) }
    }

    pub fn get(&self, shard: ShardId) -> Option<ShardHandle> {
        self.slots.read().expect("shard table lock").get(shard.0 as usize).cloned().flatten()
    }

    pub fn insert(&self, handle: ShardHandle) {
        let index = handle.shard.0 as usize;
        self.slots.write().expect("shard table lock")[index] = Some(handle);
    }

    pub fn remove(&self, shard: ShardId) {
        self.slots.write().expect("shard table lock")[shard.0 as usize] = None;
    }

    /// How many shards are served here.
    pub fn served(&self) -> u32 {
        self.slots.read().expect("shard table lock").iter().filter(|slot| slot.is_some()).count() as u32
    }
}

/// Sends shard requests to their owners.
pub struct Router {
    pub context: Arc<NodeContext>,
    pub table: Arc<ShardTable>,
    shards: u32,
}

impl Router {
    pub fn new(context: Arc<NodeContext>, table: Arc<ShardTable>, shards: u32) -> Router {
        Router { context, table, shards }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a key (a run id, or a flow name for the catalog).
    pub fn shard_of(&self, key: &str) -> ShardId {
        shard_of(key, self.shards)
    }

    /// Asks the owner of `shard`, here or elsewhere.
    pub async fn call(&self, shard: ShardId, request: ShardRequest) -> Result<ShardReply, ApiError> {
        if let Some(handle) = self.table.get(shard) {
            return self.execute(&handle, request).await;
        }
        let payload = Bytes::from(flowgrid_proto::encode(Encoding::MsgPack, &request).map_err(internal)?);
        let subject = self.context.subjects.shard_commands(shard.0);
        let started = Instant::now();
        let answer =
            tokio::time::timeout(FORWARD_TIMEOUT, self.context.nats.request(subject.clone(), payload.clone())).await;
        let refusal = match answer {
            Ok(Ok(message)) => match answer_of(&message.payload) {
                Answer::Done(outcome) => return outcome,
                Answer::Moving(refusal) => refusal,
            },
            Ok(Err(error)) => {
                let max_payload = || self.context.nats.server_info().max_payload;
                match undelivered(shard, &error, payload.len(), max_payload) {
                    refusal if is_moving(&refusal) => refusal,
                    refusal => return Err(refusal),
                }
            }
            Err(_) => return Err(not_answered(shard)),
        };
        let keyless = matches!(request, ShardRequest::Start { idempotent: false, .. });
        match self.ask_again(shard, subject, request.sent_again(), refusal, started).await {
            // The run id of a start without a key is new to this call: the run its owner
            // found is the one an earlier try started.
            Ok(ShardReply::Started(started)) if keyless => {
                Ok(ShardReply::Started(RunStarted { created: true, ..started }))
            }
            outcome => outcome,
        }
    }

    /// Asks the owner of `shard` again, after `refusal`, until [`MOVE_WAIT`] from `started`.
    /// Every try is answered on one inbox, read until the call ends: the owner's answer is
    /// taken whenever it comes, also after a quicker refusal from a coordinator that lost the
    /// shard (which may refuse every try first).
    async fn ask_again(
        &self,
        shard: ShardId,
        subject: String,
        request: ShardRequest,
        mut refusal: ApiError,
        started: Instant,
    ) -> Result<ShardReply, ApiError> {
        let nats = &self.context.nats;
        let payload = Bytes::from(flowgrid_proto::encode(Encoding::MsgPack, &request).map_err(internal)?);
        let inbox = nats.new_inbox();
        // The client is closing: nothing is sent again.
        let Ok(mut answers) = nats.subscribe(inbox.clone()).await else { return Err(refusal) };
        let mut delay = RETRY_DELAY_FIRST;
        loop {
            if started.elapsed() + delay > MOVE_WAIT {
                return Err(refusal);
            }
            let pause_until = Instant::now() + delay;
            // The pause takes the answers to earlier tries: the owner's ends the call, and a
            // refusal is one more like the one that led to this try.
            while let Some(answer) = next_answer(shard, &mut answers, pause_until).await {
                if let Answer::Done(outcome) = answer {
                    return outcome;
                }
            }
            delay = (delay * 2).min(RETRY_DELAY_MAX);
            if let Some(handle) = self.table.get(shard) {
                return self.execute(&handle, request).await;
            }
            if let Err(error) = nats.publish_with_reply(subject.clone(), inbox.clone(), payload.clone()).await {
                // An earlier try may have reached the owner.
                return Err(maybe_applied(format!("shard {shard} could not be reached ({error})")));
            }
            match next_answer(shard, &mut answers, Instant::now() + FORWARD_TIMEOUT).await {
                Some(Answer::Done(outcome)) => return outcome,
                Some(Answer::Moving(later)) => refusal = later,
                None => return Err(not_answered(shard)),
            }
        }
    }

    /// The plan of a flow version (the latest when `version` is `None`), from the flow's
    /// catalog shard; compiled once per coordinator.
    pub async fn plan(&self, name: &str, version: Option<u32>) -> Result<Arc<FlowPlan>, ApiError> {
        let known = match version {
            Some(version) => self.context.plans.get(name, version),
            None => self.context.plans.latest(name),
        };
        if let Some(plan) = known {
            return Ok(plan);
        }
        let catalog = self.shard_of(name);
        if let Some(handle) = self.table.get(catalog) {
            let name = name.to_owned();
            return handle.ask(|reply| Command::Plan { name, version, reply }).await;
        }
        let info = match self.call(catalog, ShardRequest::GetFlow { name: name.to_owned(), version }).await? {
            ShardReply::Flow(info) => info,
            other => return Err(unexpected(&other)),
        };
        self.context
            .plans
            .compile(&info.definition, info.version)
            .map_err(|error| ApiError::new(ErrorCode::Internal, format!("a deployed flow does not compile: {error}")))
    }

    /// Runs `request` on a shard served here.
    async fn execute(&self, handle: &ShardHandle, request: ShardRequest) -> Result<ShardReply, ApiError> {
        match request {
            ShardRequest::Start { run_id, flow, version, input, idempotent, parent, labels, start_at } => {
                let plan = Box::pin(self.plan(&flow, Some(version))).await?;
                let start = StartCommand { run_id, plan, input, idempotent, parent, labels, start_at };
                handle.ask(|reply| Command::Start { start, reply }).await.map(ShardReply::Started)
            }
            ShardRequest::Cancel { run_id, reason } => {
                handle.ask(|reply| Command::Cancel { run_id, reason, reply }).await.map(ShardReply::Cancelled)
            }
            ShardRequest::Redrive(request) => {
                handle.ask(|reply| Command::Redrive { request, reply }).await.map(ShardReply::Redriven)
            }
            ShardRequest::Pause { request, pause } => {
                handle.ask(|reply| Command::Pause { request, pause, reply }).await.map(ShardReply::Paused)
            }
            ShardRequest::Signal(request) => {
                handle.ask(|reply| Command::Signal { request, reply }).await.map(ShardReply::Signalled)
            }
            ShardRequest::Get { run_id, without_data } => {
                handle.ask(|reply| Command::Get { run_id, reply }).await.map(|mut view| {
                    if without_data {
                        view.drop_data();
                    }
                    ShardReply::Run(Box::new(view))
                })
            }
            ShardRequest::History { run_id, after, limit } => {
                handle.ask(|reply| Command::History { run_id, after, limit, reply }).await.map(ShardReply::History)
            }
            ShardRequest::List { query, limit } => {
                handle.ask(|reply| Command::List { query, limit, reply }).await.map(|page| match page.scanned_to {
                    // What every version answers, where the scan did not stop early.
                    None => ShardReply::Runs(page.runs),
                    Some(_) => ShardReply::RunsPage(page),
                })
            }
            ShardRequest::Deploy { definition } => {
                handle.ask(|reply| Command::Deploy { definition, reply }).await.map(ShardReply::Deployed)
            }
            ShardRequest::PauseFlow { request, pause } => {
                handle.ask(|reply| Command::PauseFlow { request, pause, reply }).await.map(ShardReply::FlowPaused)
            }
            ShardRequest::GetFlow { name, version } => handle
                .ask(|reply| Command::GetFlow { name, version, reply })
                .await
                .map(|info| ShardReply::Flow(Box::new(info))),
            ShardRequest::ListFlows => handle
                .ask(|reply| Command::ListFlows { after: None, limit: usize::MAX, bytes_unbounded: true, reply })
                .await
                .map(|page| ShardReply::Flows(page.flows)),
            ShardRequest::FlowsPage { after, limit } => handle
                .ask(|reply| Command::ListFlows { after, limit, bytes_unbounded: false, reply })
                .await
                .map(ShardReply::FlowsPage),
            ShardRequest::ChildEnded(ended) => {
                handle.ask(|reply| Command::ChildEnded { ended, reply }).await.map(ShardReply::ChildEndTaken)
            }
            ShardRequest::Gate { verb, message } => {
                handle.ask(|reply| Command::Gate { verb, message, reply }).await.map(ShardReply::GateTaken)
            }
            ShardRequest::Limits { flow } => {
                handle.ask(|reply| Command::Limits { flow, reply }).await.map(limits_reply)
            }
        }
    }
}

/// Answers requests forwarded to a shard served here until `stop`; then answers what is
/// still queued with `unavailable`, so that callers try the next owner at once.
///
/// Once the lease has lapsed since the shard was taken, another coordinator may serve it
/// and take its requests too ([`Serving`]): the subscription ends at the next request, which
/// is left unanswered as the ones queued are, and no refusal that says to ask again is sent.
/// The owner answers them; where nobody serves the shard yet, the requests sent since are
/// told so at once by NATS (no responders), and those taken here time out at their caller
/// as "may have been applied".
pub async fn serve_shard_commands(
    router: Arc<Router>,
    handle: ShardHandle,
    mut requests: async_nats::Subscriber,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    // The actor read the same term as it started (the acquire stops both if it changed since).
    let serving = Arc::new(Serving::new(router.context.lease.clone()));
    let starts = Arc::new(StartsInFlight::default());
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        if !serving.holds() {
            debug!(shard = %handle.shard, "lease lapsed: forwarded requests are left to the shard's next owner");
            let _ = requests.unsubscribe().await;
            return;
        }
        let Some(reply_to) = message.reply.clone() else { continue };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let error = crate::api::overloaded("the coordinator is handling too many requests; retry later");
            reply(&router, reply_to, Reply::<ShardReply>::Error(error)).await;
            continue;
        };
        let request = flowgrid_proto::decode::<ShardRequest>(Encoding::MsgPack, &message.payload);
        // Taken in the order the requests came, before any of them runs.
        let turn = request.as_ref().map(|request| starts.turn(request)).unwrap_or_default();
        let (router, handle, serving) = (router.clone(), handle.clone(), serving.clone());
        tokio::spawn(async move {
            let outcome = match request {
                Ok(request) => {
                    turn.earlier_done().await;
                    router.execute(&handle, request).await
                }
                Err(error) => Err(ApiError::new(ErrorCode::InvalidRequest, error.to_string())),
            };
            drop(turn);
            let answer = Reply::from(outcome);
            if serving.may_send(&answer) {
                reply(&router, reply_to, answer).await;
            }
            drop(permit);
        });
    }
    let _ = requests.unsubscribe().await;
    let moving = Reply::<ShardReply>::Error(ApiError::new(
        ErrorCode::Unavailable,
        format!("shard {} is moving to another coordinator; retry", handle.shard),
    ));
    while let Some(Some(message)) = futures::FutureExt::now_or_never(requests.next()) {
        if let Some(reply_to) = message.reply.filter(|_| serving.may_send(&moving)) {
            reply(&router, reply_to, moving.clone()).await;
        }
    }
}

/// The starts forwarded to a shard served here of runs not known to exist (sent without
/// `idempotent`: a run id made for the request), by run id, while they are executed. The
/// same start asked again after a refusal comes later on the same connection, as idempotent,
/// but its task may reach the shard's actor first, start the run and have it end (out of
/// memory): the first would then start it once more. So the one asked again waits for it.
#[derive(Default)]
struct StartsInFlight {
    runs: Mutex<HashMap<RunId, CancellationToken>>,
}

impl StartsInFlight {
    /// Where forwarded `request` stands among the starts in flight.
    fn turn(self: &Arc<Self>, request: &ShardRequest) -> StartTurn {
        let ShardRequest::Start { run_id, idempotent, .. } = request else { return StartTurn::default() };
        let mut runs = self.runs.lock().expect("starts in flight lock");
        if *idempotent {
            return StartTurn { earlier: runs.get(run_id).cloned(), _in_flight: None };
        }
        let done = CancellationToken::new();
        runs.insert(run_id.clone(), done.clone());
        let in_flight = StartInFlight { starts: self.clone(), run_id: run_id.clone(), _done: done.drop_guard() };
        StartTurn { earlier: None, _in_flight: Some(in_flight) }
    }
}

/// A forwarded request's place among the [`StartsInFlight`].
#[derive(Default)]
struct StartTurn {
    /// The same start's earlier try, still executed here.
    earlier: Option<CancellationToken>,
    /// A start of a run not known to exist, in flight until this drops.
    _in_flight: Option<StartInFlight>,
}

impl StartTurn {
    /// Waits until the same start's earlier try, if one is executed here, is done.
    async fn earlier_done(&self) {
        if let Some(earlier) = &self.earlier {
            earlier.cancelled().await;
        }
    }
}

/// A start of [`StartsInFlight`]: dropped once it is done, it tells the tries that wait.
struct StartInFlight {
    starts: Arc<StartsInFlight>,
    run_id: RunId,
    _done: DropGuard,
}

impl Drop for StartInFlight {
    fn drop(&mut self) {
        self.starts.runs.lock().expect("starts in flight lock").remove(&self.run_id);
    }
}

/// The lease term a shard's forwarded requests are served in. While the lease has held
/// without a gap since, no other coordinator can have taken the shard (the others wait out
/// a whole lease from its last renewal, and it holds two thirds of that): a refusal sent
/// here is the only answer its request gets, and asking again applies it once. Past that,
/// the shard's next owner may have taken the same request and applied it.
struct Serving {
    lease: Arc<Lease>,
    term: u64,
}

impl Serving {
    fn new(lease: Arc<Lease>) -> Serving {
        let term = lease.term();
        Serving { lease, term }
    }

    /// Whether the lease has held without a gap since the term began.
    fn holds(&self) -> bool {
        self.lease.holds(self.term)
    }

    /// Whether `answer` may be sent: any answer but a retryable refusal (its caller, or the
    /// SDK, would send the request again), and that one while the lease holds.
    fn may_send(&self, answer: &Reply<ShardReply>) -> bool {
        !matches!(answer, Reply::Error(refusal) if refusal.retryable) || self.holds()
    }
}

async fn reply(router: &Router, reply_to: async_nats::Subject, answer: Reply<ShardReply>) {
    let Ok(bytes) = flowgrid_proto::encode(Encoding::MsgPack, &answer) else { return };
    crate::api::publish(&router.context.nats, reply_to, Encoding::MsgPack, bytes).await;
}

/// Whether the owner's refusal of a forwarded request says the shard is moving (the owner
/// stops serving it, or a coordinator that no longer serves it answered), so that the request,
/// asked again, reaches the next owner. A `unavailable` that is not retryable (a commit whose
/// outcome is unknown: the request may have been applied) goes back to the caller as it is,
/// as it does when the shard is served here: a redrive sent again could apply twice.
fn is_moving(refusal: &ApiError) -> bool {
    refusal.code == ErrorCode::Unavailable && refusal.retryable
}

/// The answer to a forwarded request of `bytes` that NATS did not deliver to shard
/// `shard`'s owner: `unavailable` and retryable where nobody serves the shard (it is moving:
/// [`is_moving`] says to ask again), `payload_too_large` where the client refused to send
/// it as over the server's `max_payload` (it was never sent, so the refusal is final), and
/// otherwise an `unavailable` that may have been applied (it may have reached the owner).
fn undelivered(
    shard: ShardId,
    error: &async_nats::RequestError,
    bytes: usize,
    max_payload: impl FnOnce() -> usize,
) -> ApiError {
    match error.kind() {
        async_nats::RequestErrorKind::NoResponders => no_responders(shard),
        async_nats::RequestErrorKind::MaxPayloadExceeded => {
            let limit = match max_payload() {
                0 => "its `max_payload`".to_owned(),
                max_payload => format!("its `max_payload` of {max_payload} bytes"),
            };
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the request is {bytes} bytes as forwarded to the coordinator serving shard {shard}, over what \
                     a message may carry on this NATS server ({limit}), and was not sent: send less and pass large \
                     data by reference, or raise `max_payload` in nats-server's configuration"
                ),
            )
        }
        _ => maybe_applied(format!("shard {shard} could not be reached ({error})")),
    }
}

/// An answer to a forwarded request.
enum Answer {
    /// The owner's reply, or a refusal that is not to be asked again here.
    Done(Result<ShardReply, ApiError>),
    /// A refusal that says to ask again (see [`is_moving`]).
    Moving(ApiError),
}

/// The answer an encoded reply to a forwarded request gives.
fn answer_of(payload: &[u8]) -> Answer {
    match flowgrid_proto::decode::<Reply<ShardReply>>(Encoding::MsgPack, payload) {
        Ok(Reply::Ok(reply)) => Answer::Done(Ok(reply)),
        Ok(Reply::Error(error)) if is_moving(&error) => Answer::Moving(error),
        Ok(Reply::Error(error)) => Answer::Done(Err(error)),
        Err(error) => Answer::Done(Err(internal(error))),
    }
}

/// The next answer to a try of a forwarded request of shard `shard` on `answers`, its
/// tries' inbox, before `until`; `None` past it, or once the subscription ended.
async fn next_answer(shard: ShardId, answers: &mut async_nats::Subscriber, until: Instant) -> Option<Answer> {
    let message = tokio::time::timeout_at(until.into(), answers.next()).await.ok()??;
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Some(Answer::Moving(no_responders(shard)));
    }
    Some(answer_of(&message.payload))
}

/// The refusal of a forwarded request nobody listened for: nobody serves shard `shard`.
fn no_responders(shard: ShardId) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!(
            "no coordinator serves shard {shard} right now (it is moving between coordinators, or its owner \
             stopped answering and the others wait for its lease); retry"
        ),
    )
}

/// The answer to a forwarded request that shard `shard`'s owner did not answer in time.
fn not_answered(shard: ShardId) -> ApiError {
    maybe_applied(format!("shard {shard} did not answer within {FORWARD_TIMEOUT:?}"))
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("forwarding between coordinators failed: {error}"))
}

/// A reply of the wrong kind: coordinators of different versions talking.
pub fn unexpected(reply: &ShardReply) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("unexpected reply from the shard's owner (do all coordinators run the same version?): {reply:?}"),
    )
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[test]
    fn shard_requests_round_trip_in_messagepack() {
        let request = ShardRequest::Start {
            run_id: RunId("r-1".into()),
            flow: "media".into(),
            version: 3,
            input: serde_json::json!({"n": 1, "tags": ["a"]}),
            idempotent: true,
            start_at: Some(1_767_225_600_000),
            parent: Some(ParentRef {
                run_id: RunId("p-1".into()),
                step: "call".into(),
                item: None,
                depth: 1,
                round: 0,
            }),
            labels: [("customer".to_owned(), "acme".to_owned())].into(),
        };
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &request).unwrap();
        let decoded: ShardRequest = flowgrid_proto::decode(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{request:?}"));
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &ShardRequest::ListFlows).unwrap();
        assert!(matches!(flowgrid_proto::decode(Encoding::MsgPack, &bytes).unwrap(), ShardRequest::ListFlows));
        let request = ShardRequest::FlowsPage { after: Some("media".into()), limit: 3 };
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &request).unwrap();
        let decoded: ShardRequest = flowgrid_proto::decode(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{request:?}"));
    }

    /// A start asked again after a refusal goes as idempotent: its owner may have started the
    /// run on the first try (a coordinator that lost the shard refused it meanwhile), and
    /// then answers with that run instead of starting it again under the same id.
    #[test]
    fn a_start_asked_again_is_idempotent() {
        let start = |idempotent| ShardRequest::Start {
            run_id: RunId("r-1".into()),
            flow: "media".into(),
            version: 3,
            input: serde_json::json!({"n": 1}),
            idempotent,
            parent: None,
            labels: Labels::new(),
            start_at: None,
        };
        for first in [false, true] {
            match start(first).sent_again() {
                ShardRequest::Start { idempotent, .. } => {
                    assert!(idempotent, "a start first sent with idempotent: {first}")
                }
                other => panic!("{other:?}"),
            }
        }
        let cancel = ShardRequest::Cancel { run_id: RunId("r-1".into()), reason: String::new() };
        assert_eq!(format!("{:?}", cancel.clone().sent_again()), format!("{cancel:?}"));
    }

    /// A start asked again waits, where the shard's owner took both, for the first try of the
    /// same start still executed there: once that one is done, the run it started is found.
    #[test]
    fn a_start_asked_again_waits_for_its_first_try_in_flight() {
        let start = |run: &str, idempotent| ShardRequest::Start {
            run_id: RunId(run.into()),
            flow: "media".into(),
            version: 3,
            input: Value::Null,
            idempotent,
            parent: None,
            labels: Labels::new(),
            start_at: None,
        };
        let starts = Arc::new(StartsInFlight::default());
        let first = starts.turn(&start("r-1", false));
        assert!(first.earlier_done().now_or_never().is_some(), "the first try waits for nothing");
        let again = starts.turn(&start("r-1", true));
        let other = starts.turn(&start("r-2", true));
        let cancel = starts.turn(&ShardRequest::Cancel { run_id: RunId("r-1".into()), reason: String::new() });
        assert!(again.earlier_done().now_or_never().is_none(), "the try asked again waits for the first");
        assert!(other.earlier_done().now_or_never().is_some() && cancel.earlier_done().now_or_never().is_some());
        drop(first);
        assert!(again.earlier_done().now_or_never().is_some(), "the first try is done");
        assert!(starts.runs.lock().unwrap().is_empty(), "a start done is forgotten");
        assert!(starts.turn(&start("r-1", true)).earlier_done().now_or_never().is_some());
    }

    /// A coordinator whose lease lapsed after it took a shard sends no refusal that has its
    /// request sent again (the shard's next owner may have applied it); other answers go.
    #[test]
    fn no_refusal_to_ask_again_is_sent_once_the_lease_lapsed() {
        let lease = Arc::new(Lease::new(Duration::from_secs(30)));
        lease.renewed(Instant::now());
        let serving = Serving::new(lease.clone());
        let moving =
            Reply::<ShardReply>::Error(ApiError::new(ErrorCode::Unavailable, "shard 3 is not served right now"));
        let overloaded = Reply::<ShardReply>::Error(ApiError::new(ErrorCode::Overloaded, "too many requests"));
        let maybe = Reply::<ShardReply>::Error(maybe_applied("shard 3 did not answer".to_owned()));
        let refused = Reply::<ShardReply>::Error(ApiError::new(ErrorCode::NotFound, "no run r-1"));
        let listed = Reply::Ok(ShardReply::Runs(Vec::new()));
        let all = [&moving, &overloaded, &maybe, &refused, &listed];
        assert!(all.iter().all(|answer| serving.may_send(answer)), "the lease holds: every answer goes");
        lease.revoke();
        assert!(!serving.holds());
        assert!(!serving.may_send(&moving) && !serving.may_send(&overloaded), "retryable refusals are not sent");
        assert!([&maybe, &refused, &listed].iter().all(|answer| serving.may_send(answer)));
    }

    #[test]
    fn only_a_retryable_unavailable_is_asked_again() {
        let moving = ApiError::new(ErrorCode::Unavailable, "shard 3 is moving to another coordinator; retry");
        assert!(is_moving(&moving));
        let committed = maybe_applied("store commit of shard 3 failed (timeout)".to_owned());
        assert!(!is_moving(&committed), "a commit of unknown outcome is not sent again: {committed:?}");
        for code in [ErrorCode::Overloaded, ErrorCode::Conflict, ErrorCode::Internal] {
            assert!(!is_moving(&ApiError::new(code, "refused")), "{code}");
        }
    }

    /// A forwarded request the client refused to send as over the server's `max_payload` is
    /// refused for good: a durable submit's start is then refused, not tried again for ever.
    #[test]
    fn a_forwarded_request_over_the_servers_max_payload_is_refused_for_good() {
        let too_large = async_nats::RequestError::new(async_nats::RequestErrorKind::MaxPayloadExceeded);
        let refusal = undelivered(ShardId(3), &too_large, 2_000_000, || 1_048_576);
        assert_eq!(refusal.code, ErrorCode::PayloadTooLarge, "{refusal:?}");
        assert!(refusal.is_final() && !is_moving(&refusal), "{refusal:?}");
        assert!(refusal.message.contains("2000000 bytes") && refusal.message.contains("1048576"), "{refusal:?}");
        assert_eq!(crate::submit::after_failed_start(&refusal), crate::submit::AfterFailedStart::Refused);
        let unknown = undelivered(ShardId(3), &too_large, 2_000_000, || 0);
        assert!(unknown.is_final() && !unknown.message.contains(" 0 "), "{unknown:?}");

        let moving = async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders);
        assert!(is_moving(&undelivered(ShardId(3), &moving, 10, || 1_048_576)));
        let lost = async_nats::RequestError::new(async_nats::RequestErrorKind::TimedOut);
        let lost = undelivered(ShardId(3), &lost, 10, || 1_048_576);
        assert!(!lost.is_final() && !is_moving(&lost), "it may have been applied: {lost:?}");
    }

    /// A shard with thousands of limits in use answers a listing with its busiest, within
    /// NATS's default payload limit, and counts the others; one with few answers them all,
    /// as every version does.
    #[test]
    fn a_shard_with_many_limits_answers_its_busiest_within_a_message() {
        const GATES: usize = 5_000;
        let limit = |number: usize| LimitSummary {
            flow: "invoice".to_owned(),
            key: format!("{number:0>200}"),
            max: 4,
            rate: None,
            when_full: Default::default(),
            going: (number % 5) as u32,
            queued: (number % 7) as u32,
            next_start_ms: None,
        };
        let ShardReply::LimitsPage(page) = limits_reply((0..GATES).map(limit).collect()) else {
            panic!("a page of the busiest");
        };
        assert_eq!((page.limits.len(), page.more), (flowgrid_proto::LimitList::LIMITS_MAX, 4_000));
        assert!(page.limits.iter().all(|limit| limit.queued >= 5), "the busiest are kept");
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &Reply::Ok(ShardReply::LimitsPage(page))).unwrap();
        assert!(bytes.len() <= 1024 * 1024, "{} bytes", bytes.len());
        let few: Vec<LimitSummary> = (0..3).map(limit).collect();
        assert!(matches!(limits_reply(few.clone()), ShardReply::Limits(all) if all == few));
    }

    #[test]
    fn a_flow_definition_survives_forwarding() {
        let yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/flows/chain.yaml")).unwrap();
        let definition = flowgrid_model::parse_definition(&yaml, &flowgrid_model::Limits::default()).unwrap();
        let request = ShardRequest::Deploy { definition: Box::new(definition.clone()) };
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &request).unwrap();
        match flowgrid_proto::decode(Encoding::MsgPack, &bytes).unwrap() {
            ShardRequest::Deploy { definition: decoded } => assert_eq!(*decoded, definition),
            other => panic!("decoded {other:?}"),
        }
    }
}
