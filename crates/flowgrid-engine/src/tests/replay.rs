//! Replay: the same start and the same accepted events at the same times rebuild the
//! same run.

use serde_json::json;

use super::support::{error, evaluator, start_run, Harness};
use crate::{Effect, Run, TimerKey};

const FLOW: &str = r##"
name: replay
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    max_concurrency: 2
    tolerated_failures: 1
    retry: { max_attempts: 2, initial_backoff_ms: 100, jitter: 0.5 }
  - kind: task
    id: sum
    after: [each]
    pool: cpu
    task: sum
    input: "steps.each.output"
"##;

/// Rebuilds a run from the harness's start and history, returning it with its effects.
pub fn replay(harness: &Harness) -> (Run, Vec<Effect>) {
    let mut effects = Vec::new();
    let (plan, input, now) = (&harness.plan, &harness.input, harness.started_ms);
    let mut run = start_run(plan, input, now, harness.queued, harness.start_at, &mut effects);
    for (now, event) in &harness.history {
        assert_eq!(run.apply(evaluator(), *now, event, &mut effects), crate::Applied::Accepted);
    }
    (run, effects)
}

#[test]
fn replaying_the_history_rebuilds_the_same_run() {
    let mut harness = Harness::start(FLOW, json!(["a", "b", "c"]), 1_000);
    harness.fail(1_010, "each", Some(0), 1, error("busy", true));
    let due =
        harness.armed(&TimerKey::RetryDue { attempt: super::support::attempt("each", Some(0), 2) }).expect("armed");
    harness.succeed(1_020, "each", Some(1), 1, json!("B"));
    harness.succeed(1_021, "each", Some(1), 1, json!("again"));
    harness.fire(due, TimerKey::RetryDue { attempt: super::support::attempt("each", Some(0), 2) });

    let (middle, middle_effects) = replay(&harness);
    assert_eq!(middle.view(), harness.run.view());
    assert_eq!(middle.open_dispatches(), harness.run.open_dispatches());
    assert_eq!(middle.armed_timers(), harness.run.armed_timers());
    assert_eq!(middle_effects, harness.all_effects);

    harness.fail(due + 1, "each", Some(0), 2, error("busy", true));
    harness.succeed(due + 2, "each", Some(2), 1, json!("C"));
    harness.succeed(due + 3, "sum", None, 1, json!("BC"));
    let (end, end_effects) = replay(&harness);
    assert_eq!(end.view(), harness.run.view());
    assert_eq!(end_effects, harness.all_effects);
    assert_eq!(harness.step("sum").output, Some(json!("BC")));
    assert_eq!(harness.step("each").output, Some(json!([null, "B", "C"])));
}

/// Two cached tasks of one key: `long` goes out first, `short` once `first` has answered,
/// under a shorter timeout.
const OPENED: &str = r##"
name: opened
steps:
  - kind: task
    id: long
    pool: cpu
    task: fetch
    timeout_ms: 600000
    retry: { max_attempts: 2, initial_backoff_ms: 100, jitter: 0 }
    cache: { key: '"k"', ttl_ms: 60000 }
  - { kind: task, id: first, pool: cpu, task: t }
  - kind: task
    id: short
    after: [first]
    pool: cpu
    task: fetch
    timeout_ms: 30000
    cache: { key: '"k"', ttl_ms: 60000 }
"##;

/// The open attempts of `run`: step, when dispatched, deadline.
fn opened(run: &Run) -> Vec<(String, u64, u64)> {
    let open = run.open_dispatches().into_iter();
    open.map(|dispatch| (dispatch.attempt.step, dispatch.opened_ms, dispatch.deadline_ms)).collect()
}

/// An open attempt keeps when it was dispatched (its retry: when the retry was), and a
/// replay rebuilds it: a reload sends open tasks again oldest first by it, so the one that
/// went out first leads its cache key again, even when one that went out later is due
/// back earlier.
#[test]
fn an_open_attempt_keeps_when_it_was_dispatched_through_a_replay() {
    let mut harness = Harness::start(OPENED, json!(null), 1_000);
    harness.succeed(6_000, "first", None, 1, json!(1));
    let expected = vec![("long".to_owned(), 1_000, 601_000), ("short".to_owned(), 6_000, 36_000)];
    assert_eq!(opened(&harness.run), expected, "`long` went out first, `short` is due back first");
    assert_eq!(opened(&replay(&harness).0), expected, "replayed");

    harness.fail(6_500, "long", None, 1, error("busy", true));
    harness.fire(6_600, TimerKey::RetryDue { attempt: super::support::attempt("long", None, 2) });
    let expected = vec![("long".to_owned(), 6_600, 606_600), ("short".to_owned(), 6_000, 36_000)];
    assert_eq!(opened(&harness.run), expected, "the retry went out after `short`");
    assert_eq!(opened(&replay(&harness).0), expected, "replayed");
}
