//! The steady load of a chaos run: runs of a chain of `double` tasks (the last two in a
//! loop of two child runs) started at a fixed rate, each with its own idempotency key (so a start that timed out or met a moving
//! shard is repeated safely), and a poller that reads how each accepted run ended. Every
//! [`REDRIVE_EVERY`]th run is cancelled soon after its start and then redriven, and one
//! other in as many is paused and then resumed, so cancels, redrives, pauses and resumes
//! meet the same faults; each must still end with its expected output.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use flowgrid_sdk::{Client, ErrorCode, RunId, RunStatus, StartRun};

use crate::driver::Errors;

/// The flow every run starts, its pool and how its output follows from its input. Its
/// wait puts a durable timer in every run, and its last two doublings run in a loop of two
/// child runs (a subflow step with `repeat`, the second child started on the first one's
/// output), so kills, cuts and hand-overs also hit runs waiting on a timer, child starts,
/// child ends on their way to their parents, and loops between their iterations. Its trigger starts the runs of
/// the messages on [`EVENTS_STREAM`], so they meet the faults too. Each run cancelled
/// (before its redrive) starts one run of its failure handler [`HANDLER_FLOW`].
pub const FLOW: &str = "chaos-chain";
pub const POOL: &str = "chaos";
pub const DEFINITION: &str = r#"name: chaos-chain
description: chaos test, four doublings in a row with a durable wait before the last two, which run in a loop of two child runs (output value = input value * 16)
output: 'steps.s3.output'
trigger: { stream: CHAOS_EVENTS }
on_failure: { flow: chaos-cancelled, statuses: [cancelled] }
steps:
  - id: s1
    kind: task
    pool: chaos
    task: double
    timeout_ms: 20000
  - id: s2
    kind: task
    pool: chaos
    task: double
    after: [s1]
    input: 'steps.s1.output'
    timeout_ms: 20000
  - id: pause
    kind: wait
    after: [s2]
    duration_ms: 300
  - id: s3
    kind: subflow
    flow: chaos-double
    after: [pause]
    input: 'if iteration == 0 { steps.s2.output } else { previous }'
    repeat: { until: 'iteration >= 1', max_iterations: 2 }
"#;

/// The child flow of the last two doublings: deployed before [`DEFINITION`]. Its concurrency limit
/// (4 at once per key, started at most 40 a second per key) queues children whenever more
/// go at once or start in a burst, so kills, cuts and hand-overs also hit the messages of
/// its limits (acquire, admit, release) and the state of their start rates.
pub const CHILD_DEFINITION: &str = r#"name: chaos-double
description: chaos test, the child runs of the last two doublings, at most 4 at once and 40 starts a second of each of 3 keys
output: 'steps.d.output'
concurrency: { max: 4, rate: { runs: 40, per_ms: 1000 }, key: 'input.value % 3' }
steps:
  - id: d
    kind: task
    pool: chaos
    task: double
    timeout_ms: 20000
"#;

/// The failure handler of [`FLOW`]: deployed before it; one run per cancelled run, with
/// the failure as its input (`input.run_id` names the cancelled run).
pub const HANDLER_FLOW: &str = "chaos-cancelled";
pub const HANDLER_DEFINITION: &str = r#"name: chaos-cancelled
description: chaos test, the failure handler of chaos-chain, started once for each of its runs cancelled
output: 'steps.note.output'
steps:
  - id: note
    kind: transform
    output: '#{ cancelled: input.run_id }'
"#;

/// The id of the handler run the end of `run_id` by a cancel (before its redrive, so in
/// round 0) starts.
pub fn handler_run_id(run_id: &RunId) -> RunId {
    RunId::from_idempotency_key(HANDLER_FLOW, &format!("on_failure/{run_id}/0"))
}

/// The attempts of a run whose steps all went at the first try: two tasks and the loop's
/// two child runs.
pub const ATTEMPTS_WITHOUT_RETRIES: u32 = 4;

/// One run in this many is cancelled and redriven, and another (the third of each ten)
/// paused and resumed.
pub const REDRIVE_EVERY: u64 = 10;
const PAUSE_AT: u64 = 3;
/// The stream whose messages the flow's trigger starts runs for, and its subject.
pub const EVENTS_STREAM: &str = "CHAOS_EVENTS";
pub const EVENTS_SUBJECT: &str = "chaos.events";
/// One run in this many (the fifth of each ten) is started by a message on the events
/// stream instead of through the API.
const EVENT_EVERY: u64 = 10;

/// Start requests awaiting their reply at once; past it a start is skipped and counted.
const STARTS_PENDING_MAX: usize = 2_000;
/// How long one start keeps trying (timeouts and retryable refusals) before it gives up.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// One request's wait for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A run is first polled this long after it was accepted, then every poll period.
const POLL_AFTER: Duration = Duration::from_millis(500);
const POLL_PERIOD: Duration = Duration::from_secs(1);
/// `run.get` requests in flight at once while polling.
const POLL_CONCURRENCY: usize = 32;

/// The input of run `index` and the output it must end with.
pub fn run_input(seed: u64, index: u64) -> (Value, Value) {
    let value = i64::try_from(index % 1_000_000).unwrap_or(0) + 1;
    let tag = format!("{seed}-{index}");
    (json!({ "value": value, "tag": tag }), json!({ "value": value * 16, "tag": tag }))
}

/// How an accepted run ended, as `run.get` showed it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Attempts over all steps ([`ATTEMPTS_WITHOUT_RETRIES`] when nothing was retried).
    pub attempts: u32,
}

/// One accepted run.
#[derive(Clone, Debug)]
pub struct AcceptedRun {
    pub run_id: RunId,
    pub index: u64,
    pub expected: Value,
    pub accepted_at: Instant,
    /// Started by a message on the events stream: unknown until the trigger reads it.
    pub by_trigger: bool,
    pub outcome: Option<Outcome>,
}

/// The accepted runs and counters the progress line shows.
#[derive(Default)]
pub struct Ledger {
    pub runs: Mutex<Vec<AcceptedRun>>,
    pub accepted: AtomicU64,
    pub finished: AtomicU64,
    pub scheduled: AtomicU64,
    /// Starts that needed more than one try to be accepted.
    pub start_retried: AtomicU64,
    /// Starts that were not accepted, by kind.
    pub start_errors: Errors,
    /// `run.get` calls of the poller that failed, by kind (the run is asked again later).
    pub get_errors: Errors,
    /// Runs cancelled and then redriven.
    pub redriven: AtomicU64,
    /// Runs the grid answered were cancelled: each starts one run of [`HANDLER_FLOW`].
    pub cancelled: Mutex<Vec<RunId>>,
    /// Runs started by a message on the events stream.
    pub triggered: AtomicU64,
    /// Cancels and redrives that were not answered before the start deadline, by kind.
    pub redrive_errors: Errors,
    /// Runs paused and then resumed.
    pub paused: AtomicU64,
    /// Pauses and resumes that were not answered before the start deadline, by kind.
    pub pause_errors: Errors,
}

impl Ledger {
    fn accept(&self, run: AcceptedRun) {
        self.runs.lock().expect("ledger lock").push(run);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Accepted runs not seen ended yet.
    pub fn unfinished(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed).saturating_sub(self.finished.load(Ordering::Relaxed))
    }
}

/// Starts runs at `rate` per second until `stop`; returns once every start sent has its
/// answer (or gave up).
pub async fn start_loop(client: Client, seed: u64, rate: f64, ledger: Arc<Ledger>, stop: CancellationToken) {
    let skipped_ledger = ledger.clone();
    let skipped = move || {
        skipped_ledger.scheduled.fetch_add(1, Ordering::Relaxed);
        skipped_ledger.start_errors.add("start_skipped_backlog", 1);
    };
    crate::driver::paced(rate, STARTS_PENDING_MAX, stop, skipped, move |index, _| {
        ledger.scheduled.fetch_add(1, Ordering::Relaxed);
        let (client, ledger) = (client.clone(), ledger.clone());
        async move { start_one(&client, seed, index, &ledger).await }
    })
    .await;
}

async fn start_one(client: &Client, seed: u64, index: u64, ledger: &Ledger) {
    if index % EVENT_EVERY == EVENT_EVERY / 2 {
        return publish_one(client, seed, index, ledger).await;
    }
    let (input, expected) = run_input(seed, index);
    let key = format!("chaos-{seed}-{index}");
    let request = StartRun {
        flow: FLOW.to_owned(),
        version: None,
        input,
        idempotency_key: Some(key.clone()),
        ..Default::default()
    };
    let deadline = Instant::now() + START_DEADLINE;
    let mut tries = 0;
    loop {
        tries += 1;
        match client.start(request.clone()).await {
            Ok(started) => {
                if started.run_id != RunId::from_idempotency_key(FLOW, &key) {
                    ledger.start_errors.add("start_unexpected_run_id", 1);
                }
                if tries > 1 {
                    ledger.start_retried.fetch_add(1, Ordering::Relaxed);
                }
                if index.is_multiple_of(REDRIVE_EVERY) {
                    cancel_and_redrive(client, &started.run_id, index, ledger).await;
                } else if index % REDRIVE_EVERY == PAUSE_AT {
                    pause_and_resume(client, &started.run_id, index, ledger).await;
                }
                ledger.accept(AcceptedRun {
                    run_id: started.run_id,
                    index,
                    expected,
                    accepted_at: Instant::now(),
                    by_trigger: false,
                    outcome: None,
                });
                return;
            }
            Err(error) => {
                // With the idempotency key, repeating any start is safe; refusals that
                // cannot change (invalid input, unknown flow) are not repeated.
                if !try_again(&error, deadline).await {
                    ledger.start_errors.add(&error_kind("start", &error), 1);
                    return;
                }
            }
        }
    }
}

/// Publishes the input of run `index` on the events stream (repeated until acknowledged;
/// its message id makes a repeat one message) and accepts the run its sequence names.
async fn publish_one(client: &Client, seed: u64, index: u64, ledger: &Ledger) {
    let (input, expected) = run_input(seed, index);
    let payload = bytes::Bytes::from(serde_json::to_vec(&input).expect("a JSON value encodes"));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("chaos-{seed}-{index}").as_str());
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let published = client.jetstream().publish_with_headers(EVENTS_SUBJECT, headers.clone(), payload.clone()).await;
        let acked = match published {
            Ok(ack) => ack.await.map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match acked {
            Ok(ack) => {
                let key = format!("trigger/{EVENTS_STREAM}/{}", ack.sequence);
                ledger.triggered.fetch_add(1, Ordering::Relaxed);
                ledger.accept(AcceptedRun {
                    run_id: RunId::from_idempotency_key(FLOW, &key),
                    index,
                    expected,
                    accepted_at: Instant::now(),
                    by_trigger: true,
                    outcome: None,
                });
                return;
            }
            Err(_) if Instant::now() + Duration::from_millis(100) < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return ledger.start_errors.add("event_publish", 1),
        }
    }
}

/// Cancels a run a little after its start, then redrives it once the cancel went
/// through. Both are repeated until answered: a repeated cancel changes nothing, and a
/// repeated redrive whose first try went through is refused with `conflict` (the run goes
/// or ended again), which counts as done. A redrive the grid may have applied without
/// answering (its shard's owner was killed or paused meanwhile) is sent again only if the
/// run's view shows no redrive, as the SDK advises: it could otherwise run the run twice.
async fn cancel_and_redrive(client: &Client, run_id: &RunId, index: u64, ledger: &Ledger) {
    tokio::time::sleep(Duration::from_millis(50 + (index * 37) % 200)).await;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        match client.cancel(run_id, "chaos: cancelled, to be redriven").await {
            // It ended before the cancel: nothing to redrive.
            Ok(answer) if answer.status != RunStatus::Cancelled => return,
            Ok(_) => {
                ledger.cancelled.lock().expect("ledger lock").push(run_id.clone());
                break;
            }
            Err(error) if !try_again(&error, deadline).await => {
                return gave_up(&ledger.redrive_errors, "cancel", run_id, &error);
            }
            Err(_) => {}
        }
    }
    loop {
        match client.redrive(run_id, "chaos").await {
            Ok(_) => break,
            Err(error) if error.api().is_some_and(|refusal| refusal.code == ErrorCode::Conflict) => break,
            Err(error) if error.may_have_been_applied() => match was_redriven(client, run_id).await {
                Some(true) => {
                    eprintln!("chaos: redrive of run {run_id} was applied without an answer ({error})");
                    break;
                }
                // Not applied, or not known yet: asked again after a pause.
                _ if Instant::now() + Duration::from_millis(100) < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return gave_up(&ledger.redrive_errors, "redrive", run_id, &error),
            },
            Err(error) if !try_again(&error, deadline).await => {
                return gave_up(&ledger.redrive_errors, "redrive", run_id, &error);
            }
            Err(_) => {}
        }
    }
    ledger.redriven.fetch_add(1, Ordering::Relaxed);
}

/// Whether the view of `run_id` shows a redrive; `None` when it cannot be read now.
async fn was_redriven(client: &Client, run_id: &RunId) -> Option<bool> {
    client.get_without_data(run_id).await.ok().map(|view| view.redriven.is_some())
}

/// Counts a cancel, redrive, pause or resume given up, and says why on stderr: the
/// harness's table counts only the kind of error.
fn gave_up(errors: &Errors, what: &str, run_id: &RunId, error: &flowgrid_sdk::Error) {
    eprintln!("chaos: {what} of run {run_id} given up: {error}");
    errors.add(&error_kind(what, error), 1);
}

/// Pauses a run a little after its start and resumes it a little later. Both are repeated
/// until answered (a repeat changes nothing); a run that ended before its pause needs no
/// resume.
async fn pause_and_resume(client: &Client, run_id: &RunId, index: u64, ledger: &Ledger) {
    tokio::time::sleep(Duration::from_millis(50 + (index * 37) % 200)).await;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        match client.pause(run_id, "chaos: paused, to be resumed").await {
            Ok(answer) if answer.status.is_terminal() => return,
            Ok(_) => break,
            Err(error) if !try_again(&error, deadline).await => {
                return gave_up(&ledger.pause_errors, "pause", run_id, &error);
            }
            Err(_) => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(200 + (index * 53) % 500)).await;
    loop {
        match client.resume(run_id, "chaos").await {
            Ok(_) => break,
            Err(error) if !try_again(&error, deadline).await => {
                return gave_up(&ledger.pause_errors, "resume", run_id, &error);
            }
            Err(_) => {}
        }
    }
    ledger.paused.fetch_add(1, Ordering::Relaxed);
}

/// Whether a request that failed with `error` is tried again before `deadline` (after a
/// pause): not a refusal that cannot change (invalid input, unknown flow or run).
async fn try_again(error: &flowgrid_sdk::Error, deadline: Instant) -> bool {
    let final_refusal = error.api().is_some_and(|refusal| !refusal.retryable);
    if final_refusal || Instant::now() + Duration::from_millis(100) > deadline {
        return false;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    true
}

fn error_kind(what: &str, error: &flowgrid_sdk::Error) -> String {
    match error {
        flowgrid_sdk::Error::Api(refusal) => format!("{what}_{}", refusal.code),
        flowgrid_sdk::Error::Timeout { .. } => format!("{what}_timeout"),
        other if other.is_no_responders() => format!("{what}_no_responders"),
        _ => format!("{what}_nats"),
    }
}

/// Polls accepted runs with `run.get` until `stop`, recording how each ended.
pub async fn poll_loop(client: Client, ledger: Arc<Ledger>, stop: CancellationToken) {
    loop {
        poll_once(&client, &ledger, POLL_AFTER).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL_PERIOD) => {}
        }
    }
}

/// Polls until every accepted run has ended or `deadline` passes; returns the runs still
/// not seen ended.
pub async fn poll_until_finished(client: &Client, ledger: &Ledger, deadline: Duration) -> u64 {
    let until = Instant::now() + deadline;
    loop {
        poll_once(client, ledger, Duration::ZERO).await;
        let unfinished = ledger.unfinished();
        if unfinished == 0 || Instant::now() >= until {
            return unfinished;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One `run.get` of every accepted run older than `age` not yet seen ended.
async fn poll_once(client: &Client, ledger: &Ledger, age: Duration) {
    let due: Vec<(usize, RunId)> = {
        let runs = ledger.runs.lock().expect("ledger lock");
        runs.iter()
            .enumerate()
            .filter(|(_, run)| run.outcome.is_none() && run.accepted_at.elapsed() >= age)
            .map(|(position, run)| (position, run.run_id.clone()))
            .collect()
    };
    let results: Vec<(usize, Result<flowgrid_sdk::RunView, flowgrid_sdk::Error>)> = futures::stream::iter(
        due.into_iter().map(|(position, run_id)| async move { (position, client.get(&run_id).await) }),
    )
    .buffer_unordered(POLL_CONCURRENCY)
    .collect()
    .await;
    let mut runs = ledger.runs.lock().expect("ledger lock");
    for (position, result) in results {
        match result {
            Ok(view) if view.status.is_terminal() => {
                let attempts = view.steps.iter().map(|step| step.attempts).sum();
                runs[position].outcome = Some(Outcome {
                    status: view.status,
                    output: view.output,
                    error: view.error.map(|error| format!("{}: {}", error.code, error.message)),
                    attempts,
                });
                ledger.finished.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            // A message waits for its trigger to read it (the final check finds it if
            // it never starts).
            Err(error) if error.is_not_found() && runs[position].by_trigger => {}
            Err(error) if error.is_not_found() => ledger.get_errors.add("not_found", 1),
            Err(flowgrid_sdk::Error::Timeout { .. }) => ledger.get_errors.add("timeout", 1),
            Err(flowgrid_sdk::Error::Api(refusal)) => ledger.get_errors.add(&refusal.code.to_string(), 1),
            Err(_) => ledger.get_errors.add("nats", 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_is_valid() {
        let limits = flowgrid_model::Limits::default();
        let definition = flowgrid_model::parse_definition(DEFINITION, &limits).expect("parses");
        assert_eq!(definition.name, FLOW);
        let evaluator = flowgrid_model::Evaluator::new(&limits);
        let valid = flowgrid_model::validate(&definition, &evaluator, &limits);
        assert!(valid.is_ok(), "{:?}", valid.err());
    }

    #[test]
    fn the_handler_is_valid() {
        let limits = flowgrid_model::Limits::default();
        let definition = flowgrid_model::parse_definition(HANDLER_DEFINITION, &limits).expect("parses");
        assert_eq!(definition.name, HANDLER_FLOW);
        let valid = flowgrid_model::validate(&definition, &flowgrid_model::Evaluator::new(&limits), &limits);
        assert!(valid.is_ok(), "{:?}", valid.err());
    }

    #[test]
    fn expected_outputs_are_sixteen_times_the_input() {
        let (input, output) = run_input(7, 41);
        assert_eq!(input, json!({"value": 42, "tag": "7-41"}));
        assert_eq!(output, json!({"value": 672, "tag": "7-41"}));
    }
}
