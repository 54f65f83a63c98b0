//! Triggers: the owner of a flow's catalog shard starts a run of the flow's latest version
//! for every message of the stream its `trigger` names.
//!
//! One durable pull consumer per flow (`<grid>_trigger_<flow>` on the trigger's stream)
//! keeps the place in the stream, so a catalog shard that moves to another coordinator
//! goes on where its last owner stopped, and a message out but not acknowledged comes back
//! after the consumer's ack wait. A run's idempotency key is `trigger/<stream>/<stream
//! sequence>`: a message delivered twice starts one run. A stream made again after the
//! trigger was first deployed (deleted by hand, or lost with NATS's store) numbers its
//! messages from 1 again: its keys are `trigger/<stream>/<its creation, Unix ns>/<sequence>`,
//! so they do not find the runs of the stream before, and its consumer reads it from its
//! first message, as every one was published after the trigger was deployed. A message is
//! acknowledged once the
//! run's start is committed; one that is not JSON, whose input expression fails, or whose
//! start is refused for good (an input over the payload limit), is logged, counted and not
//! delivered again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use flowgrid_model::{Evaluator, Expr, ExprError, FlowPlan, Millis, Scope, Trigger};
use flowgrid_proto::StartRun;
use flowgrid_sdk::Client;
use flowgrid_store::ShardStore;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::actor::ShardActor;
use crate::metrics;
use crate::submit::{after_failed_start, retry_delay, AfterFailedStart, FAILED_RETRY_DELAY};

/// Messages of one trigger being started at once.
const STARTS_IN_FLIGHT_MAX: usize = 64;
/// How long a message may be out before the stream delivers it again.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long one start may take, under [`ACK_WAIT`] (and without the client's retries of
/// an overloaded grid): a start still under way when the stream delivers its message again
/// would start it twice at once, and fill the permits with copies.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before the consumer is opened again after the stream could not be read.
const REOPEN_PAUSE: Duration = Duration::from_secs(5);

/// The triggers this shard's actor runs: one per flow of its catalog whose latest version
/// has one.
#[derive(Default)]
pub(super) struct Triggers {
    running: HashMap<String, (u32, CancellationToken)>,
}

impl<S: ShardStore> ShardActor<S> {
    /// Starts, moves to the new version, or stops the trigger of `plan`'s flow, of which
    /// `plan` is now the latest version. A paused flow's trigger stops; its consumer keeps
    /// its place, so the messages published meanwhile start their runs on the resume.
    pub(super) fn update_trigger(&mut self, plan: &Arc<FlowPlan>) {
        let paused = self.flow_pauses.contains_key(&plan.name);
        let running = &mut self.triggers.running;
        let Some(trigger) = plan.definition.trigger.as_ref().filter(|_| !paused) else {
            if let Some((_, stop)) = running.remove(&plan.name) {
                let why = if paused { "the flow is paused" } else { "the latest version has none" };
                info!(flow = %plan.name, "trigger stopped: {why}");
                stop.cancel();
            }
            return;
        };
        if running.get(&plan.name).is_some_and(|(version, _)| *version == plan.version) {
            return;
        }
        if let Some((_, stop)) = running.remove(&plan.name) {
            stop.cancel();
        }
        let stop = self.loaded.child_token();
        // When a version of the flow first read this stream.
        let since_ms = self.catalog.get(&plan.name).and_then(|versions| {
            let reading = versions.iter().filter(|entry| {
                entry.plan.definition.trigger.as_ref().is_some_and(|other| other.stream == trigger.stream)
            });
            reading.map(|entry| entry.deployed_ms).min()
        });
        let consumer = TriggerConsumer {
            client: self.context.client.clone().with_request_timeout(START_TIMEOUT).with_retry_budget(Duration::ZERO),
            name: self.context.subjects.trigger_consumer(&plan.name),
            flow: plan.name.clone(),
            version: plan.version,
            since_ms: since_ms.unwrap_or(0),
            trigger: trigger.clone(),
            input: plan.trigger_input.clone().map(|expr| (expr, Arc::clone(self.context.plans.evaluator()))),
        };
        tokio::spawn(consumer.run(stop.clone()));
        running.insert(plan.name.clone(), (plan.version, stop));
    }
}

struct TriggerConsumer {
    client: Client,
    name: String,
    flow: String,
    version: u32,
    /// When the first version of the flow that reads this stream was deployed (Unix ms).
    since_ms: Millis,
    trigger: Trigger,
    /// The trigger's input expression, and the evaluator to run it.
    input: Option<(Expr, Arc<Evaluator>)>,
}

impl TriggerConsumer {
    /// Reads the stream and starts runs until `stop`; opens the consumer again after a
    /// failure (a stream deleted and made again, NATS away).
    async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(tokio::sync::Semaphore::new(STARTS_IN_FLIGHT_MAX));
        let mut warned = false;
        while !stop.is_cancelled() {
            match this.consume(&permits, &stop, &mut warned).await {
                Ok(()) => return,
                Err(error) => {
                    if !warned {
                        warn!(flow = %this.flow, stream = %this.trigger.stream, error = %error, "trigger cannot read its stream; trying again every few seconds");
                        warned = true;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(REOPEN_PAUSE) => {}
                    }
                }
            }
        }
    }

    async fn consume(
        self: &Arc<Self>,
        permits: &Arc<tokio::sync::Semaphore>,
        stop: &CancellationToken,
        warned: &mut bool,
    ) -> Result<(), String> {
        let stream =
            self.client.jetstream().get_stream(&self.trigger.stream).await.map_err(|error| error.to_string())?;
        let created_ns = stream.cached_info().created.unix_timestamp_nanos();
        let made_again = created_ns / 1_000_000 > i128::from(self.since_ms);
        let keys = if made_again {
            info!(flow = %self.flow, stream = %self.trigger.stream, "the trigger's stream was made after the trigger was deployed; its runs are keyed by its creation and it is read from its first message");
            format!("trigger/{}/{created_ns}/", self.trigger.stream)
        } else {
            format!("trigger/{}/", self.trigger.stream)
        };
        // From the first message published since the trigger was deployed: a consumer made
        // later (the flow paused meanwhile, its creation failing a while) misses none.
        let deliver_policy = if made_again {
            DeliverPolicy::All
        } else {
            let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.since_ms) * 1_000_000)
                .map_err(|error| format!("the trigger's deploy time {} is out of range: {error}", self.since_ms))?;
            DeliverPolicy::ByStartTime { start_time: since }
        };
        let config = pull::Config {
            durable_name: Some(self.name.clone()),
            description: Some(format!("flowgrid: starts a run of flow {} per message", self.flow)),
            filter_subject: self.trigger.subject.clone().unwrap_or_default(),
            deliver_policy,
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // No bound on the messages out at once (the server's default is 1,000): each
            // start that keeps failing stays out between its deliveries, and a thousand of
            // them would stop the trigger.
            max_ack_pending: -1,
            ..Default::default()
        };
        // Created, or updated to the latest version's subject and bounds. One made before
        // (by an earlier release, or by hand) keeps its deliver policy, which NATS does not
        // let change: it keeps its place in the stream.
        let consumer: PullConsumer = match stream.create_consumer(config.clone()).await {
            Ok(consumer) => consumer,
            Err(error) => {
                let existing: PullConsumer = stream.get_consumer(&self.name).await.map_err(|_| error.to_string())?;
                let kept = pull::Config { deliver_policy: existing.cached_info().config.deliver_policy, ..config };
                match stream.update_consumer(kept).await {
                    Ok(updated) => updated,
                    Err(error) => {
                        warn!(flow = %self.flow, consumer = %self.name, error = %error, "trigger cannot update its consumer; it reads with the consumer as it is (its subject may be an earlier version's): delete the consumer (`nats consumer rm <stream> <consumer>`) to have it made afresh");
                        existing
                    }
                }
            }
        };
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(STARTS_IN_FLIGHT_MAX)
            .messages()
            .await
            .map_err(|error| error.to_string())?;
        debug!(flow = %self.flow, consumer = %self.name, "trigger reading its stream");
        if std::mem::take(warned) {
            // The next failure warns again.
            info!(flow = %self.flow, stream = %self.trigger.stream, "trigger reads its stream again");
        }
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                message = messages.next() => match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        debug!(flow = %self.flow, error = %error, "trigger read failed; continuing");
                        continue;
                    }
                    None => return Err("the consumer's messages ended".to_owned()),
                },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else { return Ok(()) };
            let this = self.clone();
            let keys = keys.clone();
            tokio::spawn(async move {
                this.start(message, &keys).await;
                drop(permit);
            });
        }
    }

    /// The input of the run of a message: its payload, or what the trigger's `input`
    /// expression makes of it.
    fn input(&self, payload: Value, subject: &str, sequence: u64) -> Result<Value, ExprError> {
        let Some((expr, evaluator)) = &self.input else { return Ok(payload) };
        let message = json!({ "message": payload, "subject": subject, "sequence": sequence });
        evaluator.eval(expr, &Scope { input: Some(&message), ..Scope::default() })
    }

    /// Starts the run of one message, keyed `<keys><sequence>`; acknowledges it once the
    /// start is committed.
    async fn start(&self, message: Message, keys: &str) {
        let sequence = message.info().map(|info| info.stream_sequence).unwrap_or(0);
        let payload: serde_json::Value = match serde_json::from_slice(&message.payload) {
            Ok(payload) => payload,
            Err(error) => {
                warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger message is not JSON; no run started for it");
                count(&self.flow, "malformed");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let input = match self.input(payload, message.subject.as_str(), sequence) {
            Ok(input) => input,
            Err(error) => {
                warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "the trigger's input expression failed for this message; no run started for it");
                count(&self.flow, "input_failed");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let start = StartRun {
            flow: self.flow.clone(),
            version: Some(self.version),
            input,
            idempotency_key: Some(format!("{keys}{sequence}")),
            labels: self.trigger.labels.clone(),
            start_at_ms: None,
        };
        match self.client.start(start).await {
            Ok(started) => {
                debug!(flow = %self.flow, sequence, run = %started.run_id, created = started.created, "trigger started a run");
                count(&self.flow, "started");
                let _ = message.double_ack().await;
            }
            Err(error) => match error.api().map_or(AfterFailedStart::Soon, after_failed_start) {
                AfterFailedStart::Soon => {
                    debug!(flow = %self.flow, sequence, error = %error, "trigger start not taken yet; the message comes back");
                    let _ = message.ack_with(AckKind::Nak(Some(retry_delay(&message)))).await;
                }
                AfterFailedStart::Later => {
                    warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger start failed on the grid's side (it may have been applied); the message comes back in {FAILED_RETRY_DELAY:?}");
                    let _ = message.ack_with(AckKind::Nak(Some(FAILED_RETRY_DELAY))).await;
                }
                AfterFailedStart::Refused => {
                    warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger message refused; no run started for it");
                    count(&self.flow, "refused");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            },
        }
    }
}

fn count(flow: &str, outcome: &'static str) {
    ::metrics::counter!(metrics::TRIGGER_MESSAGES, "flow" => flow.to_owned(), "outcome" => outcome).increment(1);
}
