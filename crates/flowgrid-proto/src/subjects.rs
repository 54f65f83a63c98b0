//! NATS subjects, stream and consumer names, all derived from one prefix.

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "flowgrid";
/// Queue group of the API subjects: each request reaches one coordinator.
pub const API_QUEUE_GROUP: &str = "flowgrid-api";

/// Priority of a task whose step sets none: its pool's own subject and consumer.
pub const PRIORITY_DEFAULT: u8 = flowgrid_model::plan::PRIORITY_DEFAULT;
/// Header of a refused submit ([`Subjects::submit_refused`]): the refusal's error code.
pub const REFUSAL_CODE_HEADER: &str = "Flowgrid-Refusal-Code";
/// Header of a refused submit: the refusal's message.
pub const REFUSAL_HEADER: &str = "Flowgrid-Refusal";
/// Header of a refused submit: its sequence in the submit stream.
pub const SUBMIT_SEQUENCE_HEADER: &str = "Flowgrid-Submit-Sequence";

/// Highest task priority.
pub const PRIORITY_MAX: u8 = flowgrid_model::plan::PRIORITY_MAX;

/// A priority written as one digit from 0 to [`PRIORITY_MAX`].
fn parse_priority(text: &str) -> Option<u8> {
    match text.as_bytes() {
        [digit @ b'0'..=b'9'] => Some(digit - b'0').filter(|&priority| priority <= PRIORITY_MAX),
        _ => None,
    }
}

/// Names of everything flowgrid puts on NATS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` must be a valid subject token sequence without wildcards (checked by config).
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An API verb, e.g. `flowgrid.api.run.start`. Verbs: `flow.deploy`, `flow.list`,
    /// `flow.get`, `run.start`, `run.start_many`, `run.get`, `run.list`, `run.cancel`,
    /// `run.redrive`, `run.signal`.
    pub fn api(&self, verb: &str) -> String {
        format!("{}.api.{verb}", self.prefix)
    }

    /// Wildcard over every API verb.
    pub fn api_all(&self) -> String {
        format!("{}.api.>", self.prefix)
    }

    /// Subject a worker sends an attempt's result to (request/reply): only the shard's
    /// owner listens on it.
    pub fn shard_results(&self, shard: u32) -> String {
        format!("{}.shard.{shard}.result", self.prefix)
    }

    /// Whether `subject` is a shard's [`Subjects::shard_results`] of this grid.
    pub fn is_shard_results(&self, subject: &str) -> bool {
        let shard = subject.strip_prefix(self.prefix.as_str()).and_then(|rest| rest.strip_prefix(".shard."));
        shard.and_then(|rest| rest.strip_suffix(".result")).is_some_and(|shard| shard.parse::<u32>().is_ok())
    }

    /// Subject on which a shard's owner takes requests forwarded by other coordinators
    /// (request/reply): only the owner listens on it.
    pub fn shard_commands(&self, shard: u32) -> String {
        format!("{}.shard.{shard}.cmd", self.prefix)
    }

    /// NATS KV bucket of the grid's coordinators (see [`crate::MemberRecord`]).
    pub fn members_bucket(&self) -> String {
        format!("{}_MEMBERS", self.bucket_stem())
    }

    /// KV bucket of the live workers ([`crate::WorkerRecord`]).
    pub fn workers_bucket(&self) -> String {
        format!("{}_WORKERS", self.bucket_stem())
    }

    /// NATS KV bucket of the shard claims and the grid's settings (see [`crate::ShardClaim`]).
    pub fn shards_bucket(&self) -> String {
        format!("{}_SHARDS", self.bucket_stem())
    }

    /// NATS KV bucket of the task cache: workers' results of steps with `cache`, by a
    /// digest of their pool, task name and key.
    pub fn task_cache_bucket(&self) -> String {
        format!("{}_TASK_CACHE", self.bucket_stem())
    }

    fn bucket_stem(&self) -> String {
        self.prefix.to_uppercase().replace(['.', '-'], "_")
    }

    /// Wildcard over every shard's subjects of one shard.
    pub fn shard_all(&self, shard: u32) -> String {
        format!("{}.shard.{shard}.>", self.prefix)
    }

    /// Subject a pool's tasks are published to.
    pub fn tasks(&self, pool: &str) -> String {
        format!("{}.tasks.{pool}", self.prefix)
    }

    /// Subject a pool's tasks of one priority are published to: the default priority on the
    /// pool's subject, every other one on a lane of its own (`<pool>.p<priority>`) that
    /// workers drain before the lower ones.
    pub fn task_lane(&self, pool: &str, priority: u8) -> String {
        if priority == PRIORITY_DEFAULT {
            self.tasks(pool)
        } else {
            format!("{}.tasks.{pool}.p{priority}", self.prefix)
        }
    }

    /// Where a coordinator says it opened a lane of `pool` (core NATS, the priority as text),
    /// so that the pool's idle workers start pulling from it at once.
    pub fn lane_opened(&self, pool: &str) -> String {
        format!("{}.lanes.{pool}", self.prefix)
    }

    /// Wildcard over a pool's lanes other than the default one.
    pub fn task_lanes(&self, pool: &str) -> String {
        format!("{}.tasks.{pool}.>", self.prefix)
    }

    /// The priority of one of `pool`'s lane subjects ([`Subjects::task_lane`]).
    pub fn lane_priority(&self, pool: &str, subject: &str) -> Option<u8> {
        if subject == self.tasks(pool) {
            return Some(PRIORITY_DEFAULT);
        }
        let lane = subject.strip_prefix(&self.tasks(pool))?.strip_prefix(".p")?;
        parse_priority(lane)
    }

    /// Subject the notices of a pool's tasks cancelled are published to (core NATS).
    pub fn cancels(&self, pool: &str) -> String {
        format!("{}.cancels.{pool}", self.prefix)
    }

    /// Wildcard over every pool's tasks, every lane (the tasks stream's subjects).
    pub fn tasks_all(&self) -> String {
        format!("{}.tasks.>", self.prefix)
    }

    /// The tasks stream's subjects as versions before priority lanes made it: every pool's
    /// default subject, no lanes.
    pub fn tasks_all_before_lanes(&self) -> String {
        format!("{}.tasks.*", self.prefix)
    }

    /// JetStream stream holding tasks of every pool (work-queue retention). Like every
    /// stream and bucket name, it folds the prefix (upper-cased, `.` and `-` as `_`): two
    /// prefixes that differ only there name the same ones, and cannot share one NATS.
    pub fn tasks_stream(&self) -> String {
        format!("{}_TASKS", self.bucket_stem())
    }

    /// Durable pull consumer of one pool, shared by all of the pool's workers.
    pub fn pool_consumer(&self, pool: &str) -> String {
        format!("pool-{pool}")
    }

    /// Durable pull consumer of one of a pool's lanes: the pool's consumer for the default
    /// priority, `pool<priority>-<pool>` for the others (no pool name starts with a digit
    /// after `pool`, and a pool name holds no `.`, so no two pools' names meet).
    pub fn lane_consumer(&self, pool: &str, priority: u8) -> String {
        if priority == PRIORITY_DEFAULT {
            self.pool_consumer(pool)
        } else {
            format!("pool{priority}-{pool}")
        }
    }

    /// The pool and priority of a consumer named by [`Subjects::lane_consumer`].
    pub fn parse_lane_consumer(name: &str) -> Option<(&str, u8)> {
        let rest = name.strip_prefix("pool")?;
        if let Some(pool) = rest.strip_prefix('-') {
            return Some((pool, PRIORITY_DEFAULT));
        }
        let (priority, pool) = rest.split_once('-')?;
        let priority = parse_priority(priority).filter(|&priority| priority != PRIORITY_DEFAULT)?;
        Some((pool, priority))
    }

    /// Where the workers of a run's step publish its live output ([`crate::LiveOutput`]).
    pub fn live(&self, run_id: &str, step: &str) -> String {
        format!("{}.live.{run_id}.{step}", self.prefix)
    }

    /// Wildcard over the live output of a run's steps.
    pub fn live_of_run(&self, run_id: &str) -> String {
        format!("{}.live.{run_id}.*", self.prefix)
    }

    /// Wildcard over all live output (the live-output stream's subjects).
    pub fn live_all(&self) -> String {
        format!("{}.live.>", self.prefix)
    }

    /// JetStream stream that keeps live output for a while (limits retention).
    pub fn live_stream(&self) -> String {
        format!("{}_LIVE", self.bucket_stem())
    }

    /// Where the end of a run of `flow` is announced (flows with `publish_ended: true`).
    pub fn run_ended(&self, flow: &str) -> String {
        format!("{}.runs.ended.{flow}", self.prefix)
    }

    /// Wildcard over the run-ended announcements of every flow.
    pub fn run_ended_all(&self) -> String {
        format!("{}.runs.ended.>", self.prefix)
    }

    /// JetStream stream that keeps the run-ended announcements (limits retention).
    pub fn run_ends_stream(&self) -> String {
        format!("{}_RUN_ENDS", self.bucket_stem())
    }

    /// Durable fire-and-forget submit subject: a `StartRun` published here with a
    /// JetStream publish is kept until a coordinator has started the run.
    pub fn submit(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// JetStream stream behind [`Subjects::submit`].
    pub fn submit_stream(&self) -> String {
        format!("{}_SUBMIT", self.bucket_stem())
    }

    /// Where coordinators keep the durable submits they refused (a flow not deployed, an
    /// input its schema refuses, a malformed message), with why: the message as it was
    /// submitted, and the headers [`REFUSAL_CODE_HEADER`] and [`REFUSAL_HEADER`].
    pub fn submit_refused(&self) -> String {
        format!("{}.submit.refused", self.prefix)
    }

    /// JetStream stream behind [`Subjects::submit_refused`] (limits retention).
    pub fn submit_refused_stream(&self) -> String {
        format!("{}_SUBMIT_REFUSED", self.bucket_stem())
    }

    /// Durable consumer coordinators share to drain the submit stream.
    pub fn submit_consumer(&self) -> String {
        "coordinators".to_owned()
    }

    /// Durable consumer through which this grid reads the trigger stream of `flow`.
    pub fn trigger_consumer(&self, flow: &str) -> String {
        format!("{}{flow}", self.trigger_consumer_prefix())
    }

    /// What the names of this grid's trigger consumers start with (the flow follows).
    pub fn trigger_consumer_prefix(&self) -> String {
        format!("{}_trigger_", self.prefix.replace(['.', '*', '>'], "_"))
    }
}

/// Whether subject `filter` (with `*` for one token and `>` for the rest) takes `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (token, Some(other)) if token == other => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_result_subject_is_told_from_any_other() {
        let subjects = Subjects::new("g");
        assert!(subjects.is_shard_results(&subjects.shard_results(17)));
        for other in
            ["g.shard.x.result", "h.shard.1.result", "g.shard.1.result.more", "g.api.run.get", "g.shard..result"]
        {
            assert!(!subjects.is_shard_results(other), "{other}");
        }
    }

    #[test]
    fn a_filter_takes_the_subjects_its_wildcards_cover() {
        assert!(subject_matches("g.runs.ended.invoice", "g.runs.ended.invoice"));
        assert!(subject_matches("g.runs.ended.*", "g.runs.ended.invoice"));
        assert!(subject_matches("g.runs.>", "g.runs.ended.invoice"));
        assert!(subject_matches("*.runs.ended.invoice", "g.runs.ended.invoice"));
        assert!(!subject_matches("g.runs.ended.other", "g.runs.ended.invoice"));
        assert!(!subject_matches("g.runs.ended", "g.runs.ended.invoice"), "shorter");
        assert!(!subject_matches("g.runs.ended.invoice.x", "g.runs.ended.invoice"), "longer");
        assert!(!subject_matches("g.runs.ended.invoice.>", "g.runs.ended.invoice"), "`>` takes one token or more");
        assert!(!subject_matches("g.runs.*", "g.runs.ended.invoice"));
    }

    #[test]
    fn names_derive_from_the_prefix() {
        let subjects = Subjects::new("acme.grid");
        assert_eq!(subjects.api("run.start"), "acme.grid.api.run.start");
        assert_eq!(subjects.tasks("gpu-llm"), "acme.grid.tasks.gpu-llm");
        assert_eq!(subjects.tasks_all(), "acme.grid.tasks.>");
        assert_eq!(subjects.cancels("gpu-llm"), "acme.grid.cancels.gpu-llm");
        assert_eq!(subjects.shard_results(17), "acme.grid.shard.17.result");
        assert_eq!(subjects.tasks_stream(), "ACME_GRID_TASKS");
        assert_eq!(subjects.submit_stream(), "ACME_GRID_SUBMIT");
        assert_eq!(subjects.run_ends_stream(), "ACME_GRID_RUN_ENDS");
        assert_eq!(subjects.submit_refused_stream(), "ACME_GRID_SUBMIT_REFUSED");
        assert_eq!(subjects.live("r-1", "answer"), "acme.grid.live.r-1.answer");
        assert!(subject_matches(&subjects.live_of_run("r-1"), &subjects.live("r-1", "answer")));
        assert!(subject_matches(&subjects.live_all(), &subjects.live("r-1", "answer")));
        assert_eq!(subjects.live_stream(), "ACME_GRID_LIVE");
    }

    #[test]
    fn each_priority_has_a_lane_of_its_pool() {
        let subjects = Subjects::new("g");
        assert_eq!(subjects.task_lane("gpu", 5), "g.tasks.gpu", "the default priority keeps the pool's subject");
        assert_eq!(subjects.task_lane("gpu", 9), "g.tasks.gpu.p9");
        assert_eq!(subjects.task_lane("gpu", 0), "g.tasks.gpu.p0");
        assert!(subject_matches(&subjects.task_lanes("gpu"), "g.tasks.gpu.p9"));
        assert!(!subject_matches(&subjects.task_lanes("gpu"), "g.tasks.gpu"));
        assert!(subject_matches(&subjects.tasks_all(), "g.tasks.gpu.p0"));
        for priority in 0..=PRIORITY_MAX {
            assert_eq!(subjects.lane_priority("gpu", &subjects.task_lane("gpu", priority)), Some(priority));
            let consumer = subjects.lane_consumer("gpu", priority);
            assert_eq!(Subjects::parse_lane_consumer(&consumer), Some(("gpu", priority)));
        }
        assert_eq!(subjects.lane_consumer("gpu", 5), "pool-gpu");
        assert_eq!(subjects.lane_consumer("gpu", 7), "pool7-gpu");
        assert_eq!(subjects.lane_priority("gpu", "g.tasks.gpu.p10"), None);
        assert_eq!(subjects.lane_priority("gpu", "g.tasks.gpu.x"), None);
        assert_eq!(subjects.lane_priority("gpu", "g.tasks.gpus"), None);
        assert_eq!(Subjects::parse_lane_consumer("pool-p7-gpu"), Some(("p7-gpu", 5)), "a pool named p7-gpu");
        assert_eq!(Subjects::parse_lane_consumer("pool5-gpu"), None, "the default lane is pool-gpu");
        assert_eq!(Subjects::parse_lane_consumer("pool12-gpu"), None);
        assert_eq!(Subjects::parse_lane_consumer("coordinators"), None);
    }
}
