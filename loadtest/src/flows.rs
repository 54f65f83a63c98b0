//! The flows a workload deploys, how many tasks a run of each has, which step follows
//! which (for step overhead), and the message sizes the broker floor must copy.

use serde_json::{json, Value};

use flowgrid_model::limits::MAP_ITEMS_GOING_MAX;
use flowgrid_model::{AttemptId, RunId};
use flowgrid_proto::{encode, Encoding, Reply, ResultAck, TaskMessage, TaskResult};

use crate::args::Workload;

/// Pool of chains and maps.
pub const POOL_A: &str = "lt-a";
/// Pool of the map half of `mix`.
pub const POOL_B: &str = "lt-b";
/// Pool that no simulated worker serves (memory mode).
pub const POOL_IDLE: &str = "lt-idle";
/// The one task name of every simulated task.
pub const TASK_NAME: &str = "noop";
/// Step id of the map of `map` and `mix`.
const MAP_STEP: &str = "m";
/// Run number of the typical messages [`Plan::message_sizes`] measures (its map item is
/// this modulo the items).
const SIZES_SEQUENCE: u64 = 123_456;

/// What a task of a workload carries besides its run's id: its step, its map item and its
/// input, as the coordinator sends them.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskShape {
    pub step: String,
    pub item: Option<u32>,
    pub input: Value,
}

/// One workload made concrete: its flow and the shape of its runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub workload: Workload,
    pub flow_name: String,
    pub definition: String,
    /// Tasks one run sends to workers; the run is done when this many results are acked.
    pub tasks_per_run: u32,
    /// Map items per run (0 without a map).
    pub map_items: u32,
    pub pools: Vec<&'static str>,
}

impl Plan {
    pub fn new(workload: Workload, tasks_per_run: u32) -> Plan {
        let length = tasks_per_run.max(1);
        match workload {
            Workload::Single => Plan {
                workload,
                flow_name: "lt-single".to_owned(),
                definition: chain_definition("lt-single", POOL_A, 1, ""),
                tasks_per_run: 1,
                map_items: 0,
                pools: vec![POOL_A],
            },
            Workload::Chain => {
                let name = format!("lt-chain-{length}");
                Plan {
                    workload,
                    definition: chain_definition(&name, POOL_A, length, ""),
                    flow_name: name,
                    tasks_per_run: length,
                    map_items: 0,
                    pools: vec![POOL_A],
                }
            }
            Workload::Map => {
                let name = format!("lt-map-{length}");
                Plan {
                    workload,
                    definition: map_definition(&name, POOL_A),
                    flow_name: name,
                    tasks_per_run: length,
                    map_items: length,
                    pools: vec![POOL_A],
                }
            }
            Workload::Mix => {
                let name = format!("lt-mix-{length}");
                Plan {
                    workload,
                    definition: mix_definition(&name, length),
                    flow_name: name,
                    tasks_per_run: 2 * length,
                    map_items: length,
                    pools: vec![POOL_A, POOL_B],
                }
            }
        }
    }

    /// A one-task flow on the pool nobody serves.
    pub fn idle() -> Plan {
        Plan {
            workload: Workload::Single,
            flow_name: "lt-idle".to_owned(),
            definition: chain_definition("lt-idle", POOL_IDLE, 1, ""),
            tasks_per_run: 1,
            map_items: 0,
            pools: vec![POOL_IDLE],
        }
    }

    /// Tasks one run has out at most at once: one for a chain, the items of its map (all of
    /// them, up to the most a map has in flight), and the mix's chain task besides.
    pub fn tasks_in_flight_per_run(&self) -> usize {
        let chain = usize::from(self.workload != Workload::Map);
        chain + self.map_items.min(MAP_ITEMS_GOING_MAX) as usize
    }

    /// The input of one run.
    pub fn run_input(&self, sequence: u64) -> Value {
        if self.map_items == 0 {
            json!({ "n": sequence })
        } else {
            json!({ "n": sequence, "items": (0..self.map_items).collect::<Vec<u32>>() })
        }
    }

    /// The pool the items of this workload's map go to: `map`'s, or the `mix`'s lt-b.
    pub fn map_pool(&self) -> Option<&'static str> {
        match self.workload {
            Workload::Map => Some(POOL_A),
            Workload::Mix => Some(POOL_B),
            Workload::Single | Workload::Chain => None,
        }
    }

    /// A task of this workload on `pool`, of run number `sequence`: on the map's pool a map
    /// item, with its item as input; on any other a chain step, with the run's input (for
    /// `mix`, the chain's steps carry the whole run input, items and all).
    pub fn task_shape(&self, pool: &str, sequence: u64) -> TaskShape {
        if self.map_pool() == Some(pool) {
            let item = (sequence % u64::from(self.map_items.max(1))) as u32;
            TaskShape { step: MAP_STEP.to_owned(), item: Some(item), input: json!(item) }
        } else {
            TaskShape { step: "s1".to_owned(), item: None, input: self.run_input(sequence) }
        }
    }

    /// Bytes of a typical task message of this workload on each of its pools, in the order
    /// of [`Plan::pools`], and of the first pool's result, as the coordinator and the
    /// simulated workers encode them.
    pub fn message_sizes(&self) -> (Vec<(&'static str, usize)>, usize) {
        let attempt = |shape: &TaskShape| AttemptId {
            run_id: RunId::from_parts(1_767_225_600_000, 0x1234_5678_9abc_def0),
            step: shape.step.clone(),
            item: shape.item,
            attempt: 1,
        };
        let tasks = self
            .pools
            .iter()
            .map(|&pool| {
                let shape = self.task_shape(pool, SIZES_SEQUENCE);
                let task = TaskMessage {
                    attempt: attempt(&shape),
                    pool: pool.into(),
                    task: TASK_NAME.into(),
                    input: shape.input.into(),
                    deadline_ms: 1_767_225_900_000,
                    reply_to: "flowgrid.shard.127.result".to_owned(),
                    progress: None,
                };
                (pool, encode(Encoding::MsgPack, &task).map(|bytes| bytes.len()).unwrap_or(0))
            })
            .collect();
        let first = self.task_shape(self.pools[0], SIZES_SEQUENCE);
        let result = TaskResult { attempt: attempt(&first), output: Some(task_output()), error: None, progress: None };
        let result_bytes = encode(Encoding::MsgPack, &result).map(|bytes| bytes.len()).unwrap_or(0);
        (tasks, result_bytes)
    }
}

/// What every simulated task returns.
pub fn task_output() -> Value {
    json!({ "ok": true })
}

/// The reply the floor's responder sends, the size of the coordinator's `ResultAck`.
pub fn result_ack_bytes() -> Vec<u8> {
    encode(Encoding::MsgPack, &Reply::<ResultAck>::Ok(ResultAck { applied: true })).unwrap_or_default()
}

/// Position of a chain step (`s3` is 3); `None` for map items and other steps.
pub fn chain_position(step: &str) -> Option<u32> {
    step.strip_prefix('s')?.parse().ok()
}

fn chain_steps(pool: &str, length: u32) -> String {
    let mut steps = String::new();
    for position in 1..=length {
        steps.push_str(&format!("  - id: s{position}\n    kind: task\n    pool: {pool}\n    task: {TASK_NAME}\n"));
        if position > 1 {
            steps.push_str(&format!("    after: [s{}]\n", position - 1));
        }
    }
    steps
}

fn chain_definition(name: &str, pool: &str, length: u32, extra: &str) -> String {
    let what = if length == 1 { "one no-op task".to_owned() } else { format!("a chain of {length} no-op tasks") };
    format!("name: {name}\ndescription: load test, {what}\nsteps:\n{}{extra}", chain_steps(pool, length))
}

fn map_step(pool: &str) -> String {
    format!(
        "  - id: {MAP_STEP}\n    kind: map\n    items: input.items\n    pool: {pool}\n    task: {TASK_NAME}\n    input: item\n"
    )
}

fn map_definition(name: &str, pool: &str) -> String {
    format!(
        "name: {name}\ndescription: load test, a map of no-op tasks merged by a transform\nsteps:\n{}\
         \x20 - id: merge\n    kind: transform\n    after: [m]\n    output: '#{{ count: steps.m.output.len() }}'\n",
        map_step(pool)
    )
}

fn mix_definition(name: &str, length: u32) -> String {
    format!(
        "name: {name}\ndescription: load test, a chain on {POOL_A} next to a map on {POOL_B}\nsteps:\n{}{}\
         \x20 - id: merge\n    kind: transform\n    after: [s{length}, m]\n    output: '#{{ count: steps.m.output.len() }}'\n",
        chain_steps(POOL_A, length),
        map_step(POOL_B)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_has_one_task_out_per_chain_and_one_per_map_item() {
        assert_eq!(Plan::new(Workload::Single, 1).tasks_in_flight_per_run(), 1);
        assert_eq!(Plan::new(Workload::Chain, 3).tasks_in_flight_per_run(), 1);
        assert_eq!(Plan::new(Workload::Map, 100).tasks_in_flight_per_run(), 100);
        assert_eq!(Plan::new(Workload::Mix, 10).tasks_in_flight_per_run(), 11);
    }

    #[test]
    fn every_definition_is_valid() {
        for (workload, tasks) in [(Workload::Single, 1), (Workload::Chain, 3), (Workload::Map, 10), (Workload::Mix, 3)]
        {
            let plan = Plan::new(workload, tasks);
            let limits = flowgrid_model::Limits::default();
            let parsed = flowgrid_model::parse_definition(&plan.definition, &limits);
            let definition = parsed.unwrap_or_else(|error| panic!("{}: {error}\n{}", plan.flow_name, plan.definition));
            let evaluator = flowgrid_model::Evaluator::new(&limits);
            let valid = flowgrid_model::validate(&definition, &evaluator, &limits);
            assert!(valid.is_ok(), "{}: {:?}\n{}", plan.flow_name, valid.err(), plan.definition);
        }
    }

    #[test]
    fn chain_positions_come_from_step_ids() {
        assert_eq!(chain_position("s1"), Some(1));
        assert_eq!(chain_position("s12"), Some(12));
        assert_eq!(chain_position("m"), None);
        assert_eq!(chain_position("merge"), None);
    }

    #[test]
    fn mix_runs_have_both_halves() {
        let plan = Plan::new(Workload::Mix, 3);
        assert_eq!(plan.tasks_per_run, 6);
        assert_eq!(plan.pools, [POOL_A, POOL_B]);
    }

    /// The mix's chain steps carry the run input, its thousand items included: the sizes
    /// reported are those of each pool's tasks, not of a map item's on both.
    #[test]
    fn the_mix_reports_a_chain_step_and_a_map_item_of_their_own_sizes() {
        let plan = Plan::new(Workload::Mix, 1_000);
        let input_bytes = encode(Encoding::MsgPack, &plan.run_input(SIZES_SEQUENCE)).expect("encodes").len();
        let (tasks, _) = plan.message_sizes();
        let (pools, sizes): (Vec<_>, Vec<_>) = tasks.into_iter().unzip();
        assert_eq!(pools, [POOL_A, POOL_B]);
        assert!(sizes[0] > input_bytes, "the chain step ({} B) carries the run input ({input_bytes} B)", sizes[0]);
        assert!(sizes[1] < 200, "a map item is small: {} B", sizes[1]);
        let (map, _) = Plan::new(Workload::Map, 1_000).message_sizes();
        assert_eq!(map[0].1, sizes[1], "a map item weighs the same in `map` and `mix`");
    }
}
