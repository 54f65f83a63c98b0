//! The task cache as the engine sees it: keys on dispatches, results handed back to be
//! stored, and attempts answered by stored results.

use std::sync::Arc;

use serde_json::{json, Value};

use super::replay::replay;
use super::support::{attempt, Harness};
use crate::{Applied, CacheLookup, Effect, Event, RunStatus, StepStatus};

const FLOW: &str = r##"
name: cached
steps:
  - kind: task
    id: fetch
    pool: cpu
    task: fetch
    input: '#{ url: input.url, request: input.request }'
    cache: { key: 'input.url', ttl_ms: 60000 }
  - kind: map
    id: each
    after: [fetch]
    items: 'input.parts'
    pool: gpu
    task: embed
    cache: { ttl_ms: 1000 }
  - { kind: task, id: plain, after: [each], pool: cpu, task: plain }
"##;

fn stored(effects: &[Effect]) -> Vec<(String, Value, Value)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::CacheResult { pool, task, key, output } => {
                Some((format!("{pool}/{task}"), (**key).clone(), output.clone()))
            }
            _ => None,
        })
        .collect()
}

fn cached(number: u32, step: &str, item: Option<u32>, output: Value) -> Event {
    Event::TaskCached { attempt: attempt(step, item, number), output }
}

#[test]
fn dispatches_carry_their_key_and_workers_results_are_handed_back_to_store() {
    let input = json!({"url": "u1", "request": 7, "parts": ["x", "y", "z"]});
    let mut harness = Harness::start(FLOW, input, 0);
    let lookup = harness.dispatched()[0].cache.clone();
    assert_eq!(
        lookup,
        Some(CacheLookup { key: Arc::new(json!("u1")), ttl_ms: 60_000 }),
        "the key reads the task input"
    );
    assert_eq!(harness.succeed(10, "fetch", None, 1, json!({"body": "b"})), Applied::Accepted);
    assert_eq!(stored(&harness.effects), vec![("cpu/fetch".to_owned(), json!("u1"), json!({"body": "b"}))]);
    // Without a key expression, each item's task input is its key.
    let keys: Vec<_> = harness.dispatched().iter().map(|task| task.cache.clone().expect("a key").key).collect();
    assert_eq!(keys, vec![Arc::new(json!("x")), Arc::new(json!("y")), Arc::new(json!("z"))]);
    // Two items answered by the cache, one by a worker: only the worker's result is stored.
    assert_eq!(harness.apply(20, cached(1, "each", Some(0), json!("X"))), Applied::Accepted);
    assert!(stored(&harness.effects).is_empty(), "a cached result is not stored again");
    assert_eq!(harness.succeed(21, "each", Some(1), 1, json!("Y")), Applied::Accepted);
    assert_eq!(stored(&harness.effects), vec![("gpu/embed".to_owned(), json!("y"), json!("Y"))]);
    assert_eq!(harness.apply(22, cached(1, "each", Some(2), json!("Z"))), Applied::Accepted);
    let each = harness.step("each");
    assert_eq!((each.status, each.cached, each.output), (StepStatus::Succeeded, 2, Some(json!(["X", "Y", "Z"]))));
    // A step without `cache` looks nothing up and stores nothing.
    assert_eq!(harness.dispatched()[0].cache, None);
    harness.succeed(30, "plain", None, 1, json!(1));
    assert!(stored(&harness.effects).is_empty());
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step("fetch").cached, 0);
    // The history holds the cached results: a replay rebuilds the same run, counts included.
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_cached_result_closes_the_attempt_as_a_workers_would() {
    let mut harness = Harness::start(FLOW, json!({"url": "u1", "parts": []}), 0);
    assert_eq!(harness.apply(5, cached(1, "fetch", None, json!({"body": "b"}))), Applied::Accepted);
    let fetch = harness.step("fetch");
    assert_eq!((fetch.status, fetch.cached, fetch.attempts), (StepStatus::Succeeded, 1, 1));
    // The worker's late result for the same attempt is ignored, and nothing is stored.
    assert!(matches!(harness.succeed(6, "fetch", None, 1, json!({"body": "late"})), Applied::Ignored(_)));
    assert!(stored(&harness.all_effects).is_empty());
}

#[test]
fn a_failing_key_fails_the_run_naming_the_field() {
    let flow = FLOW.replace("key: 'input.url'", "key: 'input.url + 1'");
    let harness = Harness::start(&flow, json!({"url": null}), 0);
    assert!(harness.dispatched().is_empty(), "no task goes out without its key");
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    let error = view.error.expect("the run's error");
    assert_eq!(error.code, "expression_error");
    assert!(error.message.contains("step `fetch`, field `cache.key`"), "{}", error.message);
}
