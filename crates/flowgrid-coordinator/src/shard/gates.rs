//! Concurrency limits: at most `max` runs of a flow (of each concurrency key) go at once.
//!
//! A limit lives in the shard its flow and key hash to (its *gate*); its runs live in
//! their own shards. Three messages cross between them, each written to the sender's
//! outbox in the commit that decides it and sent until taken (ADR 0018):
//! - **acquire**: a run that starts (or is redriven) queued asks for a slot;
//! - **admit**: the gate gives it one (at once when it has room, later in the order asked);
//!   the run's shard starts the steps the run held;
//! - **release**: a run that ends gives its slot, or its place in the queue, back; the gate
//!   admits the next one.
//!
//! Each message names the run's *round* (0 for its start, `n` after its `n`th redrive), so
//! a late message of an earlier round never counts for the current one. Receivers make
//! repeats and reorderings harmless: the gate takes an acquire once and a release only for
//! the round it holds; an admission for a run that ended or went again meanwhile is
//! answered with a release of that round. So a slot taken by a run that is gone comes back,
//! and a limit never admits more runs than `max` of the rounds it was asked for.

use std::collections::{HashMap, VecDeque};

use flowgrid_engine::{Event, Run};
use flowgrid_model::{Millis, RunId};
use flowgrid_proto::{ApiError, ErrorCode, GateMessage, GateTaken};
use flowgrid_store::{keys, ShardStore};
use tracing::{debug, warn};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::clock::now_ms;
use crate::error::Result;
use crate::metrics;
use crate::records::{self, GateRecord, OutboxRecord};

/// Which of the three messages a shard takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateVerb {
    Acquire,
    Release,
    Admit,
}

impl GateVerb {
    /// The API verb that carries it.
    pub fn api_verb(self) -> &'static str {
        match self {
            GateVerb::Acquire => "gate.acquire",
            GateVerb::Release => "gate.release",
            GateVerb::Admit => "run.admit",
        }
    }
}

/// A limit: its flow and the key its runs count under.
type GateId = (String, String);

/// The limits whose gate is in this shard.
#[derive(Default)]
pub(super) struct Gates(HashMap<GateId, Gate>);

/// One limit: the runs that hold a slot and those waiting, each with its round.
#[derive(Default)]
struct Gate {
    max: u32,
    holders: HashMap<RunId, u32>,
    queue: VecDeque<(RunId, u32)>,
}

/// The shard (by its routing key) whose gate keeps the limit of `flow` and `key`.
pub fn gate_routing_key(flow: &str, key: &str) -> String {
    format!("gate\u{0}{flow}\u{0}{key}")
}

impl<S: ShardStore> ShardActor<S> {
    /// Loads the limits whose gate is in this shard: holders and queues (in the order asked).
    pub(super) async fn load_gates(&mut self) -> Result<()> {
        let mut waiting: HashMap<GateId, Vec<(Millis, RunId, u32)>> = HashMap::new();
        let mut latest: HashMap<GateId, Millis> = HashMap::new();
        for (key, value) in self.store.scan(keys::gate_range(), usize::MAX, false).await? {
            let (flow, gate_key, run_id) = keys::decode_gate(&key)?;
            let record: GateRecord = records::decode("gate record", &value)?;
            let id = (flow, gate_key);
            let gate = self.gates.0.entry(id.clone()).or_default();
            // The limit as the latest request gave it.
            if latest.get(&id).is_none_or(|&since_ms| record.since_ms >= since_ms) {
                latest.insert(id.clone(), record.since_ms);
                gate.max = record.max;
            }
            if record.admitted {
                gate.holders.insert(run_id, record.round);
            } else {
                waiting.entry(id).or_default().push((record.since_ms, run_id, record.round));
            }
        }
        for (id, mut runs) in waiting {
            runs.sort();
            let gate = self.gates.0.get_mut(&id).expect("loaded above");
            gate.queue = runs.into_iter().map(|(_, run_id, round)| (run_id, round)).collect();
        }
        Ok(())
    }

    /// Takes one of the three messages.
    pub(super) fn take_gate_message(
        &mut self,
        verb: GateVerb,
        message: GateMessage,
        batch: &mut Batch,
    ) -> std::result::Result<GateTaken, ApiError> {
        if message.flow.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "a concurrency limit's message names its flow"));
        }
        let applied = match verb {
            GateVerb::Acquire => self.acquire(message, batch),
            GateVerb::Release => self.release(message, batch),
            GateVerb::Admit => self.take_admission(message, batch),
        };
        Ok(GateTaken { applied })
    }

    /// A run asks for a slot: it gets one at once if the gate has room and nobody waits,
    /// else it waits in the queue. A repeat changes nothing.
    fn acquire(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        let id = (message.flow.clone(), message.key.clone());
        let gate = self.gates.0.entry(id.clone()).or_default();
        gate.max = message.max.max(1);
        let run_id = message.run_id.clone();
        if gate.holders.get(&run_id) == Some(&message.round)
            || gate.queue.iter().any(|(queued, round)| *queued == run_id && *round == message.round)
        {
            return false;
        }
        // A run holds one place per round; a newer round replaces an older one (whose
        // release, when it comes, no longer matches).
        gate.holders.remove(&run_id);
        gate.queue.retain(|(queued, _)| *queued != run_id);
        gate.queue.push_back((run_id.clone(), message.round));
        let record = GateRecord { round: message.round, admitted: false, since_ms: now_ms(), max: gate.max };
        batch.writes.set(keys::gate(&id.0, &id.1, &run_id), records::encode(&record));
        self.admit_waiting(&id, batch);
        true
    }

    /// A run gives its slot (or its place in the queue) back, for the round it names; the
    /// next runs in the queue get the room.
    fn release(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        let id = (message.flow.clone(), message.key.clone());
        let Some(gate) = self.gates.0.get_mut(&id) else { return false };
        let run_id = &message.run_id;
        let held = gate.holders.get(run_id) == Some(&message.round);
        let waited = gate.queue.iter().position(|(queued, round)| queued == run_id && *round == message.round);
        if held {
            gate.holders.remove(run_id);
        } else if let Some(position) = waited {
            gate.queue.remove(position);
        } else {
            return false;
        }
        batch.writes.clear(keys::gate(&id.0, &id.1, run_id));
        self.admit_waiting(&id, batch);
        if let Some(gate) = self.gates.0.get(&id).filter(|gate| gate.holders.is_empty() && gate.queue.is_empty()) {
            debug!(flow = %id.0, key = %id.1, max = gate.max, "concurrency limit idle");
            self.gates.0.remove(&id);
        }
        true
    }

    /// Gives the runs first in the queue the slots the gate has free.
    fn admit_waiting(&mut self, id: &GateId, batch: &mut Batch) {
        let Some(gate) = self.gates.0.get_mut(id) else { return };
        let mut admitted = Vec::new();
        while gate.holders.len() < gate.max as usize {
            let Some((run_id, round)) = gate.queue.pop_front() else { break };
            gate.holders.insert(run_id.clone(), round);
            let record = GateRecord { round, admitted: true, since_ms: now_ms(), max: gate.max };
            batch.writes.set(keys::gate(&id.0, &id.1, &run_id), records::encode(&record));
            admitted.push(GateMessage { flow: id.0.clone(), key: id.1.clone(), run_id, round, max: 0 });
        }
        for message in admitted {
            self.send_after_commit(OutboxRecord::Admit(message), batch);
        }
    }

    /// The gate admitted one of this shard's runs: it starts the steps it held. A run that
    /// ended, or went again in a later round, gives the slot back instead; a repeat
    /// changes nothing.
    fn take_admission(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        let current = self.runs.get(&message.run_id).map(|active| (round_of(&active.run), active.run.is_queued()));
        match current {
            Some((round, true)) if round == message.round => {
                ::metrics::counter!(metrics::RUNS_ADMITTED).increment(1);
                self.apply_event(&message.run_id, Event::Admitted, now_ms(), batch)
            }
            Some((round, false)) if round == message.round => false,
            _ => {
                debug!(run = %message.run_id, round = message.round, "admitted after it ended or went again; giving the slot back");
                self.send_after_commit(OutboxRecord::GateRelease(message), batch);
                true
            }
        }
    }

    /// Queues a run of a flow with a concurrency limit (its start or redrive in this
    /// batch left it queued): it asks the limit's gate for a slot. `key`: the run's key,
    /// if its start computed it already.
    pub(super) fn ask_for_slot(&self, run: &Run, key: Option<String>, batch: &mut Batch) {
        if let Some(message) = self.gate_message(run, key) {
            ::metrics::counter!(metrics::RUNS_QUEUED).increment(1);
            self.send_after_commit(OutboxRecord::GateAcquire(message), batch);
        }
    }

    /// A run of a flow with a concurrency limit ended: its slot (or its place in the
    /// queue) goes back.
    pub(super) fn give_slot_back(&self, run: &Run, batch: &mut Batch) {
        if let Some(message) = self.gate_message(run, None) {
            self.send_after_commit(OutboxRecord::GateRelease(GateMessage { max: 0, ..message }), batch);
        }
    }

    /// The message about `run`'s place under its flow's limit (under `key`, else the key
    /// computed from its input); `None` without a limit.
    fn gate_message(&self, run: &Run, key: Option<String>) -> Option<GateMessage> {
        let plan = run.plan();
        let concurrency = plan.concurrency.as_ref()?;
        let key = key.unwrap_or_else(|| match concurrency.key_of(self.context.plans.evaluator(), run.input()) {
            Ok(key) => key,
            Err(error) => {
                // Its start computed the key; only a changed evaluator could fail here.
                warn!(run = %run.id(), error = %error, "cannot compute the run's concurrency key; it counts under no key");
                String::new()
            }
        });
        Some(GateMessage {
            flow: plan.name.clone(),
            key,
            run_id: run.id().clone(),
            round: round_of(run),
            max: concurrency.max,
        })
    }
}

/// Which start of the run it is: 0, or how often it was redriven.
fn round_of(run: &Run) -> u32 {
    run.redriven().map_or(0, |redriven| redriven.times)
}
