//! Property tests over random DAGs of task steps fed random results in random order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use serde_json::json;

use super::replay::replay;
use super::support::{dispatches, Harness};
use crate::{Applied, Effect, Event, TaskError, TimerKey};

/// Steps of a random flow: a bit mask of the earlier steps each one runs after, and its
/// attempts in all; and the run timeout, if any.
fn flow_yaml(steps: &[(u64, u32)], timeout_ms: Option<u64>) -> String {
    let mut yaml = String::from("name: random\n");
    if let Some(timeout_ms) = timeout_ms {
        writeln!(yaml, "timeout_ms: {timeout_ms}").expect("writing to a string");
    }
    yaml.push_str("steps:\n");
    for (position, (mask, max_attempts)) in steps.iter().enumerate() {
        let after: Vec<String> =
            (0..position).filter(|earlier| mask & (1 << earlier) != 0).map(|earlier| format!("s{earlier}")).collect();
        writeln!(
            yaml,
            "  - {{ kind: task, id: s{position}, pool: p, task: t, after: [{}], retry: {{ max_attempts: {max_attempts}, initial_backoff_ms: 10 }} }}",
            after.join(", ")
        )
        .expect("writing to a string");
    }
    yaml
}

/// Checks the effects of one transition and records what they dispatched and armed.
#[derive(Default)]
struct Checker {
    dispatched: Vec<crate::TaskDispatch>,
    timers: Vec<TimerKey>,
    sent: Vec<Event>,
    applied_results: BTreeSet<String>,
    /// The driver's wheel, kept from the effects alone: it must always hold exactly the
    /// timers the run's state arms.
    wheel: BTreeMap<TimerKey, u64>,
}

impl Checker {
    fn after_transition(&mut self, harness: &Harness) {
        let view = harness.run.view();
        for dispatch in dispatches(&harness.effects) {
            let index = harness.plan.step_index(&dispatch.attempt.step).expect("dispatched step exists");
            for dep in &harness.plan.step(index).deps {
                let status = view.steps[usize::from(*dep)].status;
                assert!(status.is_resolved(), "{} dispatched while dep {dep} is {status:?}", dispatch.attempt);
            }
            self.dispatched.push(dispatch);
        }
        for effect in &harness.effects {
            match effect {
                Effect::ArmTimer { timer, due_ms, .. } => {
                    self.timers.push(timer.clone());
                    assert_eq!(self.wheel.insert(timer.clone(), *due_ms), None, "{timer:?} armed twice");
                }
                Effect::CancelTimer { timer, due_ms, .. } => {
                    assert_eq!(self.wheel.remove(timer), Some(*due_ms), "{timer:?} cancelled but not armed there");
                }
                _ => {}
            }
        }
        let wheel: Vec<(TimerKey, u64)> = self.wheel.iter().map(|(timer, due_ms)| (timer.clone(), *due_ms)).collect();
        assert_eq!(wheel, harness.run.armed_timers(), "the wheel and the run's state disagree");
        assert!(harness.finished().len() <= 1, "a run finishes at most once");
    }

    fn send(&mut self, harness: &mut Harness, now: u64, event: Event) {
        if let Event::TimerFired { timer } = &event {
            // The wheel hands a timer over when it fires.
            self.wheel.remove(timer);
        }
        let applied = harness.apply(now, event.clone());
        if applied == Applied::Accepted {
            let result_of = match &event {
                Event::TaskSucceeded { attempt, .. } | Event::TaskFailed { attempt, .. } => Some(attempt),
                Event::TimerFired { timer: TimerKey::AttemptTimeout { attempt } } => Some(attempt),
                _ => None,
            };
            if let Some(attempt) = result_of {
                assert!(self.applied_results.insert(attempt.message_id()), "{attempt} applied twice");
            }
        }
        self.sent.push(event);
        self.after_transition(harness);
    }
}

fn failure(retryable: bool) -> TaskError {
    TaskError { code: "oops".to_owned(), message: "random failure".to_owned(), retryable }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_flows_end_exactly_once(
        steps in proptest::collection::vec((any::<u64>(), 1..=3u32), 1..8),
        timeout_ms in proptest::option::of(1..80u64),
        actions in proptest::collection::vec((any::<u32>(), 0..6u8), 0..60),
    ) {
        let mut harness = Harness::start(&flow_yaml(&steps, timeout_ms), json!({"seed": 1}), 0);
        let mut checker = Checker::default();
        checker.after_transition(&harness);
        let mut now = 0;
        for (pick, kind) in actions {
            now += 1;
            let pick = pick as usize;
            let event = match kind {
                0..=2 if !checker.dispatched.is_empty() => {
                    let attempt = checker.dispatched[pick % checker.dispatched.len()].attempt.clone();
                    match kind {
                        0 => Event::TaskSucceeded { attempt, output: json!(pick) },
                        1 => Event::TaskFailed { attempt, error: failure(true) },
                        _ => Event::TaskFailed { attempt, error: failure(false) },
                    }
                }
                3 if !checker.sent.is_empty() => checker.sent[pick % checker.sent.len()].clone(),
                4 => match harness.run.armed_timers().get(pick % harness.run.armed_timers().len().max(1)) {
                    Some((timer, due_ms)) => {
                        now = now.max(*due_ms);
                        Event::TimerFired { timer: timer.clone() }
                    }
                    None => continue,
                },
                5 if !checker.timers.is_empty() => Event::TimerFired { timer: checker.timers[pick % checker.timers.len()].clone() },
                _ => continue,
            };
            checker.send(&mut harness, now, event);
        }
        // Drive the run to its end: succeed what is open, else fire the next timer.
        for _ in 0..1_000 {
            if harness.run.status().is_terminal() {
                break;
            }
            now += 1;
            let event = match harness.run.open_dispatches().first() {
                Some(open) => Event::TaskSucceeded { attempt: open.attempt.clone(), output: json!("done") },
                None => {
                    let (timer, due_ms) = harness.run.armed_timers().into_iter().min_by_key(|(_, due_ms)| *due_ms).expect("a running run waits for something");
                    now = now.max(due_ms);
                    Event::TimerFired { timer }
                }
            };
            checker.send(&mut harness, now, event);
        }
        prop_assert!(harness.run.status().is_terminal());
        prop_assert_eq!(harness.finished().len(), 1);
        prop_assert!(harness.run.open_dispatches().is_empty());
        prop_assert!(harness.run.armed_timers().is_empty());
        let (rebuilt, effects) = replay(&harness);
        prop_assert_eq!(rebuilt.view(), harness.run.view());
        prop_assert_eq!(effects, harness.all_effects.clone());
    }
}
