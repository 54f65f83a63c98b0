//! Attempts: retries and backoff, timeouts, duplicate and late results.

use flowgrid_model::limits::msgpack_bytes;
use flowgrid_model::Limits;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use super::support::{attempt, error, Harness};
use crate::{Applied, Event, RunStatus, StepStatus, TimerKey};

const RETRY: &str = r##"
name: retry
steps:
  - kind: task
    id: a
    pool: cpu
    task: t
    timeout_ms: 1000
    retry:
      max_attempts: 4
      initial_backoff_ms: 1000
      backoff_multiplier: 2.0
      max_backoff_ms: 3000
      jitter: 0.5
      retry_on: ["busy", "timeout"]
"##;

/// The delay the contract specifies: `min(initial * 2^(n-1), 3000) * (1 - 0.5 h)`.
fn expected_backoff(number: u32) -> u64 {
    let base = (1000.0 * 2f64.powi(number as i32 - 1)).min(3000.0);
    let hash = (xxh3_64(attempt("a", None, number).message_id().as_bytes()) >> 11) as f64 / (1u64 << 53) as f64;
    (base * (1.0 - 0.5 * hash)).floor() as u64
}

#[test]
fn retries_back_off_within_jitter_bounds() {
    let mut harness = Harness::start(RETRY, json!(null), 0);
    let mut now = 0;
    for number in 1..=3u32 {
        now += 10;
        assert_eq!(harness.fail(now, "a", None, number, error("busy", true)), Applied::Accepted);
        assert_eq!(harness.step_status("a"), StepStatus::Retrying);
        assert!(harness.dispatched().is_empty());
        let retry = TimerKey::RetryDue { attempt: attempt("a", None, number + 1) };
        let due = harness.armed(&retry).expect("a retry is armed");
        let base = (1000u64 << (number - 1)).min(3000);
        assert!(due - now <= base, "attempt {number}: delay {} over {base}", due - now);
        assert!(due - now >= base / 2, "attempt {number}: delay {} under half of {base}", due - now);
        assert_eq!(due - now, expected_backoff(number));
        // Early or wrong retry timers change nothing.
        let wrong = TimerKey::RetryDue { attempt: attempt("a", None, number + 2) };
        assert_eq!(harness.fire(due, wrong), Applied::Ignored("timer not armed"));
        assert_eq!(harness.fire(due, retry), Applied::Accepted);
        assert_eq!(harness.dispatched().len(), 1);
        assert_eq!(harness.dispatched()[0].attempt, attempt("a", None, number + 1));
        assert_eq!(harness.dispatched()[0].deadline_ms, due + 1000);
        now = due;
    }
    assert_eq!(harness.fail(now + 1, "a", None, 4, error("busy", true)), Applied::Accepted);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error, Some(error("busy", true)));
    assert_eq!(view.steps[0].attempts, 4);
}

#[test]
fn backoff_is_the_same_in_every_run_with_the_same_attempts() {
    let due = |_: ()| {
        let mut harness = Harness::start(RETRY, json!(null), 0);
        harness.fail(50, "a", None, 1, error("busy", true));
        harness.armed(&TimerKey::RetryDue { attempt: attempt("a", None, 2) })
    };
    assert_eq!(due(()), due(()));
}

#[test]
fn errors_outside_the_policy_are_not_retried() {
    let mut harness = Harness::start(RETRY, json!(null), 0);
    harness.fail(5, "a", None, 1, error("bad_input", true));
    assert_eq!(harness.run.status(), RunStatus::Failed);

    let mut harness = Harness::start(RETRY, json!(null), 0);
    harness.fail(5, "a", None, 1, error("busy", false));
    assert_eq!(harness.run.status(), RunStatus::Failed);
}

#[test]
fn timeout_then_retry_then_success() {
    let mut harness = Harness::start(RETRY, json!(null), 0);
    let timeout = TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) };
    assert_eq!(harness.run.armed_timers(), vec![(timeout.clone(), 1000)]);
    assert_eq!(harness.fire(1000, timeout.clone()), Applied::Accepted);
    assert_eq!(harness.step_status("a"), StepStatus::Retrying);
    let retry = TimerKey::RetryDue { attempt: attempt("a", None, 2) };
    let due = harness.armed(&retry).expect("the timeout is retried");
    assert!(harness.run.open_dispatches().is_empty());
    // The late result of the timed-out attempt is ignored, as is its timer again.
    assert_eq!(harness.succeed(1001, "a", None, 1, json!(1)), Applied::Ignored("attempt not open"));
    assert_eq!(harness.fire(1002, timeout), Applied::Ignored("timer not armed"));
    harness.fire(due, retry);
    assert_eq!(harness.run.open_dispatches(), harness.dispatched());
    assert_eq!(harness.succeed(due + 5, "a", None, 2, json!("ok")), Applied::Accepted);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"a": "ok"})));
}

#[test]
fn duplicate_result_is_ignored() {
    let mut harness = Harness::start(super::flows_chain(), json!({"n": 0}), 0);
    assert_eq!(harness.succeed(1, "a", None, 1, json!({"n": 1})), Applied::Accepted);
    assert_eq!(harness.succeed(2, "a", None, 1, json!({"n": 5})), Applied::Ignored("step not running"));
    assert_eq!(harness.fail(3, "a", None, 1, error("busy", true)), Applied::Ignored("step not running"));
    assert_eq!(harness.step("a").output, Some(json!({"n": 1})));
    assert_eq!(harness.history.len(), 1);
}

#[test]
fn late_result_from_an_old_attempt_is_ignored() {
    let mut harness = Harness::start(RETRY, json!(null), 0);
    harness.fail(10, "a", None, 1, error("busy", true));
    let retry = TimerKey::RetryDue { attempt: attempt("a", None, 2) };
    let due = harness.armed(&retry).expect("a retry is armed");
    assert_eq!(harness.succeed(due - 1, "a", None, 1, json!("old")), Applied::Ignored("attempt not open"));
    assert_eq!(harness.succeed(due - 1, "a", None, 2, json!("early")), Applied::Ignored("attempt not open"));
    harness.fire(due, retry);
    assert_eq!(harness.succeed(due + 1, "a", None, 1, json!("old")), Applied::Ignored("attempt not open"));
    assert_eq!(harness.succeed(due + 2, "a", None, 2, json!("new")), Applied::Accepted);
    assert_eq!(harness.step("a").output, Some(json!("new")));
}

#[test]
fn results_for_other_runs_steps_or_items_are_ignored() {
    let mut harness = Harness::start(RETRY, json!(null), 0);
    let mut other_run = attempt("a", None, 1);
    other_run.run_id.0 = "run-2".into();
    let event = crate::Event::TaskSucceeded { attempt: other_run, output: json!(1) };
    assert_eq!(harness.apply(1, event), Applied::Ignored("attempt of another run"));
    assert_eq!(harness.succeed(1, "zzz", None, 1, json!(1)), Applied::Ignored("no such step"));
    assert_eq!(harness.succeed(1, "a", Some(0), 1, json!(1)), Applied::Ignored("attempt does not fit the step"));
    assert_eq!(harness.run.status(), RunStatus::Running);
}

#[test]
fn progress_shows_with_its_step_and_goes_to_the_next_attempts() {
    let yaml = r##"
name: progress
steps:
  - { kind: task, id: a, pool: cpu, task: t, retry: { max_attempts: 3, initial_backoff_ms: 100, jitter: 0 } }
  - { kind: map, id: m, items: "[1, 2]", pool: cpu, task: t, retry: { max_attempts: 2, initial_backoff_ms: 100, jitter: 0 } }
"##;
    let mut harness = Harness::start(yaml, json!(null), 0);
    assert!(harness.dispatched().iter().all(|dispatch| dispatch.progress.is_none()), "nothing reported yet");
    let progress =
        |step: &str, item, number, details| Event::TaskProgress { attempt: attempt(step, item, number), details };
    assert_eq!(harness.apply(10, progress("a", None, 1, json!({"done": 40}))), Applied::Accepted);
    assert!(harness.effects.is_empty(), "progress changes nothing else");
    assert_eq!(harness.step("a").progress, Some(json!({"done": 40})));
    assert_eq!(harness.apply(11, progress("a", None, 2, json!({"done": 99}))), Applied::Ignored("attempt not open"));
    assert_eq!(harness.apply(12, progress("a", None, 1, json!({"done": 60}))), Applied::Accepted, "the latest counts");

    // The attempt fails: its retry is sent the progress it got to, and keeps showing it.
    assert_eq!(harness.fail(20, "a", None, 1, error("busy", true)), Applied::Accepted);
    assert_eq!(harness.step("a").progress, Some(json!({"done": 60})));
    assert_eq!(harness.fire(120, TimerKey::RetryDue { attempt: attempt("a", None, 2) }), Applied::Accepted);
    let retried = harness.dispatched();
    assert_eq!(retried[0].progress.as_deref(), Some(&json!({"done": 60})));
    let (replayed, _) = super::replay::replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the progress");

    // A map item's progress is its own: the other item's retry starts from nothing.
    assert_eq!(harness.apply(130, progress("m", Some(0), 1, json!("half"))), Applied::Accepted);
    assert_eq!(harness.step("m").progress, None, "a map shows counts, not its items' progress");
    assert_eq!(harness.fail(140, "m", Some(0), 1, error("busy", true)), Applied::Accepted);
    assert_eq!(harness.fail(141, "m", Some(1), 1, error("busy", true)), Applied::Accepted);
    harness.fire(240, TimerKey::RetryDue { attempt: attempt("m", Some(0), 2) });
    assert_eq!(harness.dispatched()[0].progress.as_deref(), Some(&json!("half")));
    harness.fire(241, TimerKey::RetryDue { attempt: attempt("m", Some(1), 2) });
    assert_eq!(harness.dispatched()[0].progress, None);

    // An attempt's reports past the limit are ignored: the history stays bounded.
    let limit = flowgrid_model::limits::PROGRESS_REPORTS_MAX;
    for n in 0..limit {
        assert_eq!(harness.apply(250, progress("a", None, 2, json!(n))), Applied::Accepted);
    }
    let over = harness.apply(251, progress("a", None, 2, json!("over")));
    assert_eq!(over, Applied::Ignored("too many progress reports for one attempt"));
    assert_eq!(harness.step("a").progress, Some(json!(limit - 1)), "the last report taken shows");

    // Once the step succeeds its output shows, and progress no more.
    assert_eq!(harness.succeed(300, "a", None, 2, json!("ok")), Applied::Accepted);
    assert_eq!(harness.step("a").progress, None);
    assert_eq!(harness.apply(301, progress("a", None, 2, json!({"done": 100}))), Applied::Ignored("step not running"));
}

/// An attempt's reports count against a byte budget as well as a number: past it they are
/// not kept, and the next attempt starts a budget of its own.
#[test]
fn an_attempts_progress_reports_stop_at_their_byte_budget() {
    let yaml = r##"
name: progress
steps:
  - { kind: task, id: a, pool: cpu, task: t, retry: { max_attempts: 2, initial_backoff_ms: 100, jitter: 0 } }
"##;
    let mut harness = Harness::start(yaml, json!(null), 0);
    let report = |number, n: u64| Event::TaskProgress {
        attempt: attempt("a", None, number),
        details: json!({ "n": n, "pad": "p".repeat(60 * 1024) }),
    };
    // 61 KiB each as counted (60 KiB of padding and a few bytes, rounded up).
    let fit = flowgrid_model::limits::PROGRESS_BYTES_PER_ATTEMPT_MAX / (61 * 1024);
    for n in 0..fit {
        assert_eq!(harness.apply(10, report(1, n)), Applied::Accepted, "report {n}");
    }
    let over = harness.apply(11, report(1, fit));
    assert_eq!(over, Applied::Ignored("progress reports of one attempt over their size budget"));
    assert_eq!(harness.step("a").progress.as_ref().map(|shown| shown["n"].clone()), Some(json!(fit - 1)));
    let small = Event::TaskProgress { attempt: attempt("a", None, 1), details: json!(1) };
    assert_eq!(harness.apply(12, small), Applied::Accepted, "a report that still fits is kept");

    assert_eq!(harness.fail(20, "a", None, 1, error("busy", true)), Applied::Accepted);
    assert_eq!(harness.fire(120, TimerKey::RetryDue { attempt: attempt("a", None, 2) }), Applied::Accepted);
    assert_eq!(harness.apply(130, report(2, 0)), Applied::Accepted, "a new attempt, a new budget");
}

/// A retry is sent the last progress only when the two fit in one payload: its task message
/// carries both, and the NATS server is only known to take one payload. Else it goes
/// without, and the step still shows the progress.
#[test]
fn a_retry_leaves_out_progress_that_would_not_fit_in_a_payload_with_its_input() {
    let yaml = r##"
name: progress
steps:
  - { kind: task, id: a, pool: cpu, task: t, retry: { max_attempts: 3, initial_backoff_ms: 100, jitter: 0 } }
"##;
    let payload_bytes_max = Limits::default().payload_bytes_max;
    let input = json!("i".repeat(payload_bytes_max - 16 * 1024));
    let details = json!({ "cursor": "p".repeat(60_000) });
    assert!(msgpack_bytes(&input) + msgpack_bytes(&details) > payload_bytes_max);
    let mut harness = Harness::start(yaml, input.clone(), 0);
    let report = Event::TaskProgress { attempt: attempt("a", None, 1), details: details.clone() };
    assert_eq!(harness.apply(10, report), Applied::Accepted);
    harness.fail(20, "a", None, 1, error("busy", true));
    harness.fire(120, TimerKey::RetryDue { attempt: attempt("a", None, 2) });

    let retried = harness.dispatched();
    assert_eq!(retried.len(), 1);
    assert_eq!(*retried[0].input, input);
    let sent = msgpack_bytes(&*retried[0].input) + retried[0].progress.as_deref().map_or(0, msgpack_bytes);
    assert!(sent <= payload_bytes_max, "{sent} bytes of input and progress, over {payload_bytes_max}");
    assert_eq!(retried[0].progress, None);
    assert_eq!(harness.run.open_dispatches(), retried, "republished as it was sent");
    assert_eq!(harness.step("a").progress, Some(details), "the step still shows how far it got");

    // A smaller report of the retry fits with the input, and goes to the next attempt.
    let small = json!({ "cursor": 7 });
    harness.apply(130, Event::TaskProgress { attempt: attempt("a", None, 2), details: small.clone() });
    harness.fail(140, "a", None, 2, error("busy", true));
    harness.fire(340, TimerKey::RetryDue { attempt: attempt("a", None, 3) });
    assert_eq!(harness.dispatched()[0].progress.as_deref(), Some(&small));
}

/// Retries every second, each attempt up to 10 s, the step 2.5 s in all.
const TOTAL: &str = r##"
name: total
steps:
  - kind: task
    id: a
    pool: cpu
    task: t
    timeout_ms: 10000
    total_timeout_ms: 2500
    retry: { max_attempts: 10, initial_backoff_ms: 1000, backoff_multiplier: 1.0, max_backoff_ms: 1000, jitter: 0 }
    catch: [{ errors: [timeout], next: gave_up }]
  - { kind: transform, id: gave_up, output: 'steps.a.error.message' }
"##;

#[test]
fn a_total_timeout_caps_each_attempt_and_stops_the_retries() {
    let mut harness = Harness::start(TOTAL, json!(null), 0);
    assert_eq!(harness.dispatched()[0].deadline_ms, 2_500, "the step's end, not the attempt's 10 s");
    assert_eq!(harness.fail(100, "a", None, 1, error("busy", true)), Applied::Accepted);
    assert_eq!(harness.fire(1_100, TimerKey::RetryDue { attempt: attempt("a", None, 2) }), Applied::Accepted);
    assert_eq!(harness.dispatched()[0].deadline_ms, 2_500);
    assert_eq!(harness.fail(1_200, "a", None, 2, error("busy", true)), Applied::Accepted);
    assert_eq!(harness.step_status("a"), StepStatus::Retrying, "a retry at 2,200 still fits");
    assert_eq!(harness.fire(2_200, TimerKey::RetryDue { attempt: attempt("a", None, 3) }), Applied::Accepted);
    // The third attempt is cut off at the step's end; no retry fits any more.
    assert_eq!(harness.fire(2_500, TimerKey::AttemptTimeout { attempt: attempt("a", None, 3) }), Applied::Accepted);
    let step = harness.step("a");
    assert_eq!((step.status, step.caught, step.attempts), (StepStatus::Failed, true, 3), "{step:?}");
    let error = step.error.expect("the step's error");
    assert_eq!(error.code, "timeout");
    assert!(
        error.message.contains("total_timeout_ms of 2500 ms (3 attempts; the last one was cut short by it)"),
        "{error:?}"
    );
    assert_eq!(harness.run.status(), RunStatus::Succeeded, "the catch took it");
}

/// An attempt cut short by the step's budget says so, whether or not a retry was left.
#[test]
fn an_attempt_cut_short_by_the_total_timeout_names_it_without_retries_too() {
    let once = TOTAL.replace("max_attempts: 10", "max_attempts: 1");
    let mut harness = Harness::start(&once, json!(null), 0);
    assert_eq!(harness.dispatched()[0].deadline_ms, 2_500);
    assert_eq!(harness.fire(2_500, TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) }), Applied::Accepted);
    let error = harness.step("a").error.expect("the step's error");
    assert_eq!(error.code, "timeout");
    assert!(error.message.contains("total_timeout_ms of 2500 ms (1 attempt; the last one was cut short"), "{error:?}");
}

#[test]
fn a_failure_whose_retry_would_come_too_late_fails_the_step_at_once() {
    let mut harness = Harness::start(TOTAL, json!(null), 0);
    assert_eq!(harness.fail(1_600, "a", None, 1, error("busy", true)), Applied::Accepted);
    let step = harness.step("a");
    assert_eq!((step.status, step.attempts), (StepStatus::Failed, 1), "a retry at 2,600 would be too late");
    assert!(step.error.unwrap().message.contains("the last one failed with `busy`"));
    // Without a total timeout the same failure is retried.
    let mut harness = Harness::start(&TOTAL.replace("    total_timeout_ms: 2500\n", ""), json!(null), 0);
    assert_eq!(harness.dispatched()[0].deadline_ms, 10_000);
    harness.fail(1_600, "a", None, 1, error("busy", true));
    assert_eq!(harness.step_status("a"), StepStatus::Retrying);
}

/// Retries after a second, each attempt up to a minute, the step a minute in all.
const LATE_RETRY: &str = r##"
name: late
steps:
  - kind: task
    id: a
    pool: cpu
    task: t
    timeout_ms: 60000
    total_timeout_ms: 60000
    retry: { max_attempts: 3, initial_backoff_ms: 1000, backoff_multiplier: 1.0, max_backoff_ms: 1000, jitter: 0 }
"##;

/// A retry due before the step's budget ran out but fired after it (a shard reloaded late)
/// is not sent: the step fails with `timeout` at once.
#[test]
fn a_retry_fired_after_the_total_timeout_fails_the_step_unsent() {
    let mut harness = Harness::start(LATE_RETRY, json!(null), 0);
    assert_eq!(harness.fail(49_000, "a", None, 1, error("busy", true)), Applied::Accepted);
    let retry = TimerKey::RetryDue { attempt: attempt("a", None, 2) };
    assert_eq!(harness.armed(&retry), Some(50_000), "due before the budget runs out");
    assert_eq!(harness.fire(65_000, retry), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "no attempt goes out with the budget spent");
    let step = harness.step("a");
    assert_eq!((step.status, step.attempts), (StepStatus::Failed, 1), "{step:?}");
    let error = step.error.expect("the step's error");
    assert_eq!(error.code, "timeout");
    assert!(error.message.contains("total_timeout_ms of 60000 ms (1 attempt; the retry"), "{error:?}");
    assert_eq!(harness.run.status(), RunStatus::Failed);
}
