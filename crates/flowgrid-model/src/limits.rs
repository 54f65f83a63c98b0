//! Limits on definitions, payloads and expressions. Each is enforced with an error that
//! names the limit and the value that broke it.

use serde::{Deserialize, Serialize};

/// Defaults follow DESIGN.md; every field can be raised by configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Serialized definition size: a definition is read whole on every deploy.
    pub definition_bytes_max: usize,
    /// Steps per definition: keeps plans, validation and run state small.
    pub steps_max: usize,
    /// Nesting depth of any JSON value (inputs, outputs, definitions): bounds recursion.
    pub nesting_depth_max: usize,
    /// Items one `map` step fans out over.
    pub map_items_max: usize,
    /// Task input or output, serialized: one message must stay well under NATS's payload.
    pub payload_bytes_max: usize,
    /// Operations one expression evaluation may take before it is stopped.
    pub expression_operations_max: u64,
    /// Bytes of text in one value an expression handles, every string in it counted
    /// together (a map step's merged outputs are one value): bounds an evaluation's memory.
    pub expression_text_bytes_max: usize,
    /// Expression source length.
    pub expression_bytes_max: usize,
    /// Length of a step id, flow name, pool or task name.
    pub name_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            definition_bytes_max: 1024 * 1024,
            steps_max: 1_000,
            nesting_depth_max: 32,
            map_items_max: MAP_ITEMS_MAX,
            payload_bytes_max: 1024 * 1024,
            expression_operations_max: 100_000,
            expression_text_bytes_max: 64 * 1024 * 1024,
            expression_bytes_max: 16 * 1024,
            name_bytes_max: 128,
        }
    }
}

/// Why the grid does not take an error code a worker sends (or a flow test answers with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCodeProblem {
    /// Empty, or only white space: retry policies and catches match an error by its code.
    Blank,
    /// Longer than [`Limits::name_bytes_max`], or with control characters.
    NotTaken,
}

impl Limits {
    /// What is wrong with an error code, if anything: it must name the failure in a few
    /// printable characters, as retry policies and catches match it.
    pub fn error_code_problem(&self, code: &str) -> Option<ErrorCodeProblem> {
        if code.trim().is_empty() {
            return Some(ErrorCodeProblem::Blank);
        }
        (code.len() > self.name_bytes_max || code.chars().any(char::is_control)).then_some(ErrorCodeProblem::NotTaken)
    }
}

/// Counts the bytes written to it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `value` written as JSON, counted without writing it anywhere.
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).map_or(usize::MAX, |()| counter.0)
}

/// The length of `value` written as MessagePack (with field names, as the API's
/// `rmp_serde::to_vec_named`), the encoding in which the API measures a start's input and a
/// signal's data against [`Limits::payload_bytes_max`], counted without writing it anywhere.
/// A value's two sizes differ both ways: a float such as `0.5` takes 3 bytes of JSON and 9
/// of MessagePack, a control character 6 bytes of JSON and 1 of MessagePack.
pub fn msgpack_bytes<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = Counter(0);
    rmp_serde::encode::write_named(&mut counter, value).map_or(usize::MAX, |()| counter.0)
}

/// Cuts `text` by at least `over` bytes (at a character boundary) and ends it with `mark`:
/// what makes a message that carries it fit, each byte of text taking at least a byte of
/// the message away (as JSON, and as MessagePack, whose markers only shrink).
pub fn cut_to_fit(text: &mut String, over: usize, mark: &str) {
    let mut end = text.len().saturating_sub(over + mark.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(mark);
}

/// Items one `map` step fans out over by default ([`Limits::map_items_max`]).
pub const MAP_ITEMS_MAX: usize = 100_000;

/// How deep sub-flows may nest: a run started by a `subflow` step of a run started by a
/// `subflow` step ... A flow that calls itself without end is stopped here.
pub const SUBFLOW_DEPTH_MAX: u32 = 8;
/// Child runs one subflow step with `items` has going at once (its `max_concurrency`, and
/// its default): a parent that ends while they go cancels each in the one commit that ends
/// it, a record per child (some 700 bytes), so that commit stays well within a
/// transaction.
pub const CHILDREN_GOING_MAX: u32 = 1_000;
/// Child runs one run may have going at once over all its subflow steps (each step with
/// `items` its `max_concurrency`, one for each other subflow step): a run that ends
/// cancels each of them in the commit that ends it, as [`CHILDREN_GOING_MAX`] says.
pub const CHILDREN_GOING_RUN_MAX: u32 = 5_000;
/// Items one map step has in flight at once (its `max_concurrency`, and its default): the
/// step's start evaluates and dispatches that many inputs in one turn of its shard (each
/// up to a payload), and its end tells the workers of every item still going.
pub const MAP_ITEMS_GOING_MAX: u32 = 10_000;

/// How often one run may be redriven: each redrive adds to its history, which a shard
/// replays when it loads the run.
pub const REDRIVES_MAX: u32 = 100;

/// How often one run may be paused: each pause and resume adds to its history.
pub const PAUSES_MAX: u32 = 1_000;

/// The longest id a signal's sender may give it (bytes): it is kept in the run's history.
pub const SIGNAL_ID_BYTES_MAX: usize = 128;

/// The longest reason a cancel, redrive, pause or resume may give (bytes): it is kept in
/// the run's history, and a pause's in its view.
pub const REASON_BYTES_MAX: usize = 1_024;

/// Progress reports one attempt may make: each is a record of its run's history, which a
/// reload replays, so a worker reporting in a tight loop must not grow it without bound.
/// At one every 5 s that is about 14 hours of one attempt.
pub const PROGRESS_REPORTS_MAX: u32 = 10_000;

/// The largest progress report (bytes of its result message): a report says how far an
/// attempt got (a count, a stage, a cursor), and each is kept in the run's history.
pub const PROGRESS_BYTES_MAX: usize = 64 * 1024;

/// What the progress reports of one attempt may add up to (bytes of JSON, each report
/// counted in whole KiB); past it they are not kept. With [`PROGRESS_REPORTS_MAX`] and
/// [`PROGRESS_BYTES_MAX`] alone, one attempt could leave 640 MB of history, which every
/// reload of its run reads back.
pub const PROGRESS_BYTES_PER_ATTEMPT_MAX: u64 = 16 * 1024 * 1024;

/// The largest `concurrency.max` a flow may give: a limit's gate keeps every slot it hands
/// out in one shard's memory and store, and a larger bound is no limit in practice.
pub const CONCURRENCY_MAX: u32 = 100_000;

/// Bytes of a run's concurrency key (what `concurrency.key` gives), at most: the key is
/// part of every store key and message of its limit, as an idempotency key is of a start.
pub const CONCURRENCY_KEY_BYTES_MAX: usize = 256;

/// The longest a task's cached result may be reused (`cache.ttl_ms`), 30 days: the task
/// cache's bucket keeps entries no longer than this.
pub const CACHE_TTL_MS_MAX: u64 = 30 * 24 * 60 * 60 * 1000;

/// The longest time a definition may name, 366 days (a `wait`, a schedule's `every_ms`):
/// anything longer is a mistake in the definition, or in the data an expression reads.
pub const DURATION_MS_MAX: u64 = 366 * 24 * 60 * 60 * 1000;

/// Depth of nested arrays and objects (a scalar is depth 0).
pub fn nesting_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(nesting_depth).max().unwrap_or(0),
        serde_json::Value::Object(fields) => 1 + fields.values().map(nesting_depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_wait_is_the_one_its_error_message_names() {
        assert!(crate::plan::WAIT_MS_EXPECTED.contains(&crate::plan::WAIT_MS_MAX.to_string()));
    }

    #[test]
    fn nesting_depth_counts_containers() {
        assert_eq!(nesting_depth(&serde_json::json!(1)), 0);
        assert_eq!(nesting_depth(&serde_json::json!({"a": [1, {"b": []}]})), 4);
    }
}
