//! The API: idempotent starts, refused definitions and requests, cancel, list and paging.

use std::collections::HashSet;
use std::time::Duration;

use flowgrid_model::ParentRef;
use flowgrid_proto::{
    decode, encode, ChildRunEnded, Encoding, Reply, RunStarted, StartChildRun, CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE,
};
use flowgrid_sdk::{ErrorCode, ListRuns, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::{json, Value};

use crate::{deploy, refusal, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// A task on a pool that no worker serves: runs of this flow stay running.
const IDLE_FLOW: &str = r#"
name: idle
steps:
  - id: wait
    kind: task
    pool: idle
    task: echo
"#;

fn start(flow: &str, input: serde_json::Value, key: Option<&str>) -> StartRun {
    StartRun { flow: flow.into(), version: None, input, idempotency_key: key.map(str::to_owned), ..Default::default() }
}

/// A run id no run has, far longer than any the grid gives, is refused as an invalid
/// request that names the field, in a short message, by every verb that looks a run up:
/// it was looked up (a key the store may refuse, answered `unavailable` and retried for
/// ever) and echoed whole in a `not_found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_id_longer_than_any_the_grid_gives_is_refused_by_every_verb() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let long = RunId("r".repeat(12_000).into());
    let parent = ParentRef { run_id: long.clone(), step: "invoke".into(), item: None, round: 0, depth: 1 };
    let child_start = StartChildRun {
        flow: "idle".into(),
        version: None,
        input: Default::default(),
        parent,
        labels: Default::default(),
    };
    let child_end = ChildRunEnded {
        parent: long.clone(),
        step: "invoke".into(),
        item: None,
        child: RunId("c".into()),
        status: RunStatus::Succeeded,
        output: Some(json!(1)),
        error: None,
        refused: false,
    };
    let refusals = [
        ("run.get", "run_id", client.get(&long).await.map(drop)),
        ("run.history", "run_id", client.history(&long, None, None).await.map(drop)),
        ("run.cancel", "run_id", client.cancel(&long, "").await.map(drop)),
        ("run.pause", "run_id", client.pause(&long, "").await.map(drop)),
        ("run.redrive", "run_id", client.redrive(&long, "").await.map(drop)),
        ("run.signal", "run_id", client.signal(&long, "approve", json!(1)).await.map(drop)),
        ("run.start_child", "parent.run_id", client.start_child(&child_start).await.map(drop)),
        ("run.child_ended", "parent", client.child_ended(&child_end).await.map(drop)),
    ];
    for (verb, field, outcome) in refusals {
        let error = outcome.expect_err("refused");
        let refused = refusal(&error);
        assert_eq!((refused.code, refused.retryable), (ErrorCode::InvalidRequest, false), "{verb}: {error:?}");
        assert!(refused.message.len() < 1_024, "{verb}: a message of {} bytes", refused.message.len());
        assert!(refused.message.starts_with(&format!("{field}: ")), "{verb}: {}", refused.message);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idempotency_key_gives_the_same_run_also_after_it_ended() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;

    let first = client.start(start("echo-once", json!({"n": 1}), Some("order-1"))).await.or_logs(&grid)?;
    assert!(first.created, "{first:?}");
    assert_eq!(first.run_id, RunId::from_idempotency_key("echo-once", "order-1"), "run id derives from the key");
    let again = client.start(start("echo-once", json!({"n": 2}), Some("order-1"))).await.or_logs(&grid)?;
    assert_eq!((again.run_id.clone(), again.created), (first.run_id.clone(), false), "{again:?}");

    let view = grid.wait_run(&client, &first.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"n": 1})), "the first start's input wins: {view:?}");

    let after_end = client.start(start("echo-once", json!({"n": 3}), Some("order-1"))).await.or_logs(&grid)?;
    assert_eq!((after_end.run_id.clone(), after_end.created), (first.run_id.clone(), false), "{after_end:?}");
    let other = client.start(start("echo-once", json!({"n": 4}), Some("order-2"))).await.or_logs(&grid)?;
    assert!(other.created && other.run_id != first.run_id, "another key is another run: {other:?}");

    let runs = client.list(ListRuns { flow: Some("echo-once".into()), ..Default::default() }).await?;
    assert_eq!(runs.runs.len(), 2, "two keys, two runs: {runs:?}");
    let view = client.get(&first.run_id).await.or_logs(&grid)?;
    assert_eq!(view.input, json!({"n": 1}), "repeated starts do not touch the run");
    Ok(())
}

/// (flow name, definition, expected issue path, text the issue message must contain).
const INVALID_DEFINITIONS: &[(&str, &str, &str, &str)] = &[
    (
        "bad-cycle",
        r#"
name: bad-cycle
steps:
  - {id: first, kind: task, pool: a, task: echo, after: [second]}
  - {id: second, kind: task, pool: a, task: echo, after: [first]}
"#,
        "steps[0](first)",
        "second",
    ),
    (
        "bad-after",
        r#"
name: bad-after
steps:
  - {id: first, kind: task, pool: a, task: echo}
  - {id: second, kind: task, pool: a, task: echo, after: [frist]}
"#,
        "steps[1](second).after[0]",
        "frist",
    ),
    (
        "bad-duplicate",
        r#"
name: bad-duplicate
steps:
  - {id: same, kind: task, pool: a, task: echo}
  - {id: same, kind: transform, output: '1'}
"#,
        "steps[1](same).id",
        "same",
    ),
    (
        "bad-field",
        r#"
name: bad-field
steps:
  - id: first
    kind: task
    pool: a
    task: echo
    retyr: {max_attempts: 2}
"#,
        "steps[0](first).retyr",
        "unknown field `retyr`",
    ),
    (
        "bad-expression",
        r#"
name: bad-expression
steps:
  - id: first
    kind: task
    pool: a
    task: echo
    input: '#{ a: input.x +  }'
"#,
        "steps[0](first).input",
        "",
    ),
    (
        "listed-branch",
        r#"
name: listed-branch
steps:
  - { id: route, kind: choice, choices: [{ when: 'input.x', next: a }], default: b }
  - { id: a, kind: task, pool: a, task: echo, after: [route] }
  - { id: b, kind: task, pool: a, task: echo }
"#,
        "steps[1](a).after[0]",
        "branches to this step",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_definitions_are_refused_with_located_issues_and_nothing_is_deployed() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;

    for (name, definition, path, mentions) in INVALID_DEFINITIONS {
        let error = match client.deploy(*definition).await {
            Ok(deployed) => panic!("{name} was deployed: {deployed:?}\n{}", grid.logs()),
            Err(error) => error,
        };
        let refused = refusal(&error);
        assert_eq!(refused.code, ErrorCode::InvalidDefinition, "{name}: {refused:?}");
        assert!(!refused.retryable, "{name}: a refused definition is not retryable: {refused:?}");
        let issue = refused.issues.iter().find(|issue| issue.path == *path);
        let issue = issue.unwrap_or_else(|| panic!("{name}: no issue at `{path}`: {:?}", refused.issues));
        assert!(issue.message.contains(mentions), "{name}: the issue should mention `{mentions}`: {issue:?}");
        if *name == "bad-cycle" {
            let cycle = refused.issues.iter().find(|issue| issue.message.contains("cycle"));
            let cycle = cycle.unwrap_or_else(|| panic!("bad-cycle: no issue names the cycle: {:?}", refused.issues));
            assert!(cycle.message.contains("first") && cycle.message.contains("second"), "the cycle's path: {cycle:?}");
        }
    }

    deploy(&grid, &client, ECHO_FLOW).await?;
    let flows = client.flows().await.or_logs(&grid)?;
    let names: Vec<&str> = flows.flows.iter().map(|flow| flow.name.as_str()).collect();
    assert_eq!(names, vec!["echo-once"], "only the valid flow is deployed");
    for (name, ..) in INVALID_DEFINITIONS {
        let error = client.flow(name, None).await.expect_err("a refused flow does not exist");
        assert!(error.is_not_found(), "{name}: {error:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_listed_a_page_at_a_time_in_name_order() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let long = "é".repeat(3_000);
    // Names hash onto different shards; deployed out of order.
    for n in [4, 0, 6, 2, 5, 1, 3] {
        let description = if n == 3 { long.as_str() } else { "short" };
        let definition = format!(
            "name: page-{n}\ndescription: {description}\nsteps:\n  - {{ id: s, kind: task, pool: a, task: echo }}\n"
        );
        deploy(&grid, &client, &definition).await?;
    }
    // Half of the shards' pages come from another coordinator.
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, Duration::from_secs(60)).await?;
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = client.flows_page(cursor.take(), Some(3)).await.or_logs(&grid)?;
        pages.push(page.flows.iter().map(|flow| flow.name.clone()).collect::<Vec<_>>());
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages,
        [vec!["page-0", "page-1", "page-2"], vec!["page-3", "page-4", "page-5"], vec!["page-6"]],
        "three flows a page, in name order"
    );
    let all = client.flows().await.or_logs(&grid)?;
    assert_eq!(all.flows.len(), 7, "every page: {all:?}");
    assert_eq!(all.next_cursor, None);
    // A long description is cut in the listing; the flow itself has all of it.
    let listed = all.flows.iter().find(|flow| flow.name == "page-3").and_then(|flow| flow.description.clone());
    assert_eq!(listed, Some(format!("{}…", "é".repeat(1_024))));
    let whole = client.flow("page-3", None).await.or_logs(&grid)?.definition.description;
    assert_eq!(whole.as_deref(), Some(long.as_str()));

    for (limit, cursor, mentions) in [
        (Some(0), None, "limit must be 1 to 1000, it is 0"),
        (Some(1_001), None, "limit must be 1 to 1000"),
        (None, Some("no such name!".to_owned()), "is no flow's name; pass the `next_cursor`"),
    ] {
        let error = client.flows_page(cursor, limit).await.expect_err("a bad page is refused");
        let refused = refusal(&error);
        assert_eq!(refused.code, ErrorCode::InvalidRequest, "{refused:?}");
        assert!(refused.message.contains(mentions), "{refused:?}");
    }
    Ok(())
}

/// Sends raw bytes to an API verb and returns the reply's payload and whether it was JSON.
async fn raw_request(grid: &Grid, verb: &str, payload: Vec<u8>, json: bool) -> anyhow::Result<(Vec<u8>, bool)> {
    let nats = grid.nats_client().await?;
    let mut request = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(10)));
    if json {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE);
        request = request.headers(headers);
    }
    let reply = nats.send_request(format!("{}.api.{verb}", grid.prefix), request).await?;
    let content_type = reply.headers.as_ref().and_then(|headers| headers.get(CONTENT_TYPE_HEADER));
    let reply_json = Encoding::from_content_type(content_type.map(|value| value.as_str())) == Encoding::Json;
    Ok((reply.payload.to_vec(), reply_json))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_many_starts_each_run_and_refuses_a_bad_start_alone() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;

    let blob = "x".repeat(2 * 1024 * 1024);
    let starts = vec![
        start("echo-once", json!({"n": 1}), None),
        start("no-such-flow", json!({}), None),
        start("echo-once", json!({"n": 2}), Some("batch-key")),
        start("echo-once", json!({"blob": blob}), None),
        start("echo-once", json!({"n": 3}), Some("batch-key")),
    ];
    let outcomes = client.start_many(&starts).await.or_logs(&grid)?;
    assert_eq!(outcomes.len(), starts.len(), "one outcome per start: {outcomes:?}");
    let first = outcomes[0].as_ref().map_err(|error| anyhow::anyhow!("{error}\n{}", grid.logs()))?.clone();
    assert!(first.created, "{first:?}");
    let unknown = outcomes[1].as_ref().expect_err("an unknown flow is refused");
    assert_eq!(refusal(unknown).code, ErrorCode::NotFound, "{unknown:?}");
    let keyed = outcomes[2].as_ref().map_err(|error| anyhow::anyhow!("{error}"))?.clone();
    assert_eq!(keyed.run_id, RunId::from_idempotency_key("echo-once", "batch-key"));
    let too_large = outcomes[3].as_ref().expect_err("a 2 MiB input is refused");
    assert_eq!(refusal(too_large).code, ErrorCode::PayloadTooLarge, "{too_large:?}");
    let again = outcomes[4].as_ref().map_err(|error| anyhow::anyhow!("{error}"))?;
    assert_eq!(again.run_id, keyed.run_id, "the same key in one batch is the same run: {outcomes:?}");
    assert!(keyed.created != again.created, "exactly one of the two starts created it: {outcomes:?}");

    let view = grid.wait_run(&client, &first.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"n": 1})), "{view:?}");
    let view = grid.wait_run(&client, &keyed.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let runs = client.list(ListRuns { ..Default::default() }).await.or_logs(&grid)?;
    assert_eq!(runs.runs.len(), 2, "the refused starts created nothing: {runs:?}");

    for count in [0, flowgrid_sdk::START_MANY_RUNS_MAX + 1] {
        let starts = vec![start("echo-once", json!({}), None); count];
        let error = client.start_many(&starts).await.expect_err("an empty or oversized batch is refused");
        assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
        assert!(refusal(&error).message.contains("1 to 1000 starts"), "{error:?}");
    }

    // Starts from many tasks through the batcher: each gets its own run, and each run ends.
    let batcher = flowgrid_sdk::StartBatcher::new(client.clone(), 16, 2);
    let mut started = tokio::task::JoinSet::new();
    for n in 0..100 {
        let batcher = batcher.clone();
        started.spawn(async move { batcher.start(start("echo-once", json!({"n": n}), None)).await });
    }
    let mut ids = HashSet::new();
    while let Some(outcome) = started.join_next().await {
        ids.insert(outcome?.or_logs(&grid)?.run_id);
    }
    assert_eq!(ids.len(), 100, "100 starts, 100 runs");
    for run_id in &ids {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    }

    // Starts too large together for one message (16 of 900 KB against the server's 8 MB)
    // go in smaller batches: each is taken, none is refused for the others' size.
    let batcher = flowgrid_sdk::StartBatcher::new(client.clone(), 256, 1);
    let pad = "x".repeat(900 * 1024);
    let large = (0..16).map(|n| batcher.start(start("idle", json!({"n": n, "pad": pad}), None)));
    deploy(&grid, &client, IDLE_FLOW).await?;
    let outcomes = futures::future::join_all(large).await;
    let refused: Vec<String> =
        outcomes.iter().filter_map(|outcome| outcome.as_ref().err()).map(|e| e.to_string()).collect();
    assert!(refused.is_empty(), "{} of 16 refused: {:?}", refused.len(), refused.first());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, IDLE_FLOW).await?;

    let blob = "x".repeat(2 * 1024 * 1024);
    let error = client.start(start("idle", json!({"blob": blob}), None)).await.expect_err("a 2 MiB input is refused");
    assert_eq!(refusal(&error).code, ErrorCode::PayloadTooLarge, "{error:?}\n{}", grid.logs());
    assert!(!refusal(&error).retryable, "{error:?}");

    let error = client.start(start("no-such-flow", json!({}), None)).await.expect_err("an unknown flow is refused");
    assert_eq!(refusal(&error).code, ErrorCode::NotFound, "{error:?}");

    let (payload, reply_json) =
        raw_request(&grid, "run.start", vec![0xc1, 0xff, 0x00, 0x13, 0x37], false).await.or_logs(&grid)?;
    assert!(!reply_json, "a MessagePack request gets a MessagePack reply");
    let reply: Reply<RunStarted> = decode(Encoding::MsgPack, &payload)?;
    match reply {
        Reply::Error(error) => {
            assert_eq!(error.code, ErrorCode::InvalidRequest, "{error:?}");
            assert!(!error.message.is_empty() && !error.retryable, "{error:?}");
        }
        Reply::Ok(started) => panic!("garbage started a run: {started:?}"),
    }

    let missing_flow = br#"{"input": {"x": 1}}"#.to_vec();
    let (payload, reply_json) = raw_request(&grid, "run.start", missing_flow, true).await.or_logs(&grid)?;
    assert!(reply_json, "a JSON request gets a JSON reply: {}", String::from_utf8_lossy(&payload));
    let reply: Reply<RunStarted> = serde_json::from_slice(&payload)?;
    assert!(matches!(&reply, Reply::Error(error) if error.code == ErrorCode::InvalidRequest), "{reply:?}");

    let misspelt = serde_json::to_vec(&json!({"flow": "idle", "idempotencyKey": "k"}))?;
    let (payload, _) = raw_request(&grid, "run.start", misspelt, true).await.or_logs(&grid)?;
    let reply: Reply<RunStarted> = serde_json::from_slice(&payload)?;
    assert!(
        matches!(&reply, Reply::Error(error) if error.code == ErrorCode::InvalidRequest
            && error.message.contains("unknown field `idempotencyKey`")),
        "a misspelt field is refused by name: {reply:?}"
    );

    let good = serde_json::to_vec(&json!({"flow": "idle", "input": {"via": "json"}}))?;
    let (payload, reply_json) = raw_request(&grid, "run.start", good, true).await.or_logs(&grid)?;
    assert!(reply_json, "a JSON request gets a JSON reply");
    let text: serde_json::Value = serde_json::from_slice(&payload)?;
    let started: Reply<RunStarted> = serde_json::from_value(text.clone())?;
    let started = started.into_result().map_err(|error| anyhow::anyhow!("JSON start refused: {error:?}"))?;
    assert!(started.created && started.flow == "idle", "{text}");
    assert!(text["ok"]["run_id"].is_string(), "the reply is plain JSON: {text}");

    // The header's name in any case, as some clients write it.
    let nats = grid.nats_client().await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("content-type", "application/json");
    let request = async_nats::Request::new().payload(b"{}".to_vec().into()).headers(headers);
    let reply = nats.send_request(format!("{}.api.flow.list", grid.prefix), request).await?;
    let listed: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|error| anyhow::anyhow!("not JSON ({error}): {:?}", reply.payload))?;
    assert!(listed["ok"]["flows"].is_array(), "{listed}");

    let runs = client.list(ListRuns { ..Default::default() }).await.or_logs(&grid)?;
    let ids: Vec<&RunId> = runs.runs.iter().map(|run| &run.run_id).collect();
    assert_eq!(ids, vec![&started.run_id], "only the JSON start created a run: {runs:?}");
    let view = client.get(&started.run_id).await.or_logs(&grid)?;
    assert_eq!(view.input, json!({"via": "json"}));

    // Messages about a concurrency limit name a flow, a key and a run that go into stored
    // keys: each is bounded, so an oversized one is refused alone instead of failing the
    // commit of its shard's whole batch.
    let long = "k".repeat(10_000);
    for (what, message) in [
        ("key", json!({"flow": "idle", "key": long, "run_id": started.run_id})),
        ("flow", json!({"flow": long, "run_id": started.run_id})),
        ("run_id", json!({"flow": "idle", "run_id": long})),
        // Bounds no definition may give (a rate of a year and more never lets its limit go).
        ("max", json!({"flow": "idle", "run_id": started.run_id, "max": 100_001})),
        ("rate", json!({"flow": "idle", "run_id": started.run_id, "rate": {"runs": 1, "per_ms": u64::MAX}})),
    ] {
        for verb in ["gate.acquire", "gate.release", "run.admit"] {
            let (payload, _) = raw_request(&grid, verb, serde_json::to_vec(&message)?, true).await.or_logs(&grid)?;
            let reply: serde_json::Value = serde_json::from_slice(&payload)?;
            assert_eq!(reply["error"]["code"], "invalid_request", "{verb} with a long {what}: {reply}");
            assert!(reply["error"]["message"].as_str().is_some_and(|text| text.contains(what)), "{reply}");
        }
    }

    // The encoding round trip of an ordinary request still works after all that.
    let bytes = encode(Encoding::MsgPack, &start("idle", json!(1), Some("k")))?;
    let (payload, _) = raw_request(&grid, "run.start", bytes, false).await.or_logs(&grid)?;
    let reply: Reply<RunStarted> = decode(Encoding::MsgPack, &payload)?;
    assert!(matches!(reply, Reply::Ok(RunStarted { created: true, .. })), "{reply:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_run_ends_it_cancelled() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, IDLE_FLOW).await?;
    let run = client.start(start("idle", json!({}), None)).await.or_logs(&grid)?;

    wait_for("the task step to be running", RUN_DEADLINE, || {
        let client = client.clone();
        let run_id = run.run_id.clone();
        async move {
            let view = client.get(&run_id).await.ok()?;
            (step(&view, "wait").status == StepStatus::Running).then_some(())
        }
    })
    .await
    .or_logs(&grid)?;

    let cancelled = client.cancel(&run.run_id, "test asked").await.or_logs(&grid)?;
    assert_eq!(cancelled.status, RunStatus::Cancelled, "{cancelled:?}");
    let view = client.get(&run.run_id).await.or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Cancelled, "{view:?}");
    assert!(view.ended_ms.is_some(), "{view:?}");
    assert_eq!(step(&view, "wait").status, StepStatus::Cancelled, "{view:?}");

    let again = client.cancel(&run.run_id, "twice").await.or_logs(&grid)?;
    assert_eq!(again.status, RunStatus::Cancelled, "cancelling an ended run returns its status: {again:?}");
    let error = client.cancel(&RunId("no-such-run".into()), "x").await.expect_err("unknown run");
    assert!(error.is_not_found(), "{error:?}");
    Ok(())
}

fn query(flow: Option<&str>, status: Option<RunStatus>, limit: Option<u32>, cursor: Option<String>) -> ListRuns {
    ListRuns { flow: flow.map(str::to_owned), status, limit, cursor, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_list_filters_by_flow_and_status_and_pages_with_a_cursor() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    deploy(&grid, &client, IDLE_FLOW).await?;

    let mut finished = Vec::new();
    for n in 0..5 {
        let run = client.start(start("echo-once", json!({"n": n}), None)).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        finished.push(run.run_id);
    }
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(client.start(start("idle", json!({}), None)).await.or_logs(&grid)?.run_id);
    }

    let echo_runs = client.list(query(Some("echo-once"), None, None, None)).await.or_logs(&grid)?;
    let ids: HashSet<&RunId> = echo_runs.runs.iter().map(|run| &run.run_id).collect();
    assert_eq!(ids, finished.iter().collect(), "{echo_runs:?}");
    assert!(echo_runs.runs.iter().all(|run| run.flow == "echo-once" && run.status == RunStatus::Succeeded));
    assert!(echo_runs.next_cursor.is_none(), "everything fit in one page: {echo_runs:?}");

    let running = client.list(query(None, Some(RunStatus::Running), None, None)).await.or_logs(&grid)?;
    let ids: HashSet<&RunId> = running.runs.iter().map(|run| &run.run_id).collect();
    assert_eq!(ids, idle.iter().collect(), "{running:?}");
    let none = client.list(query(Some("echo-once"), Some(RunStatus::Running), None, None)).await.or_logs(&grid)?;
    assert!(none.runs.is_empty(), "{none:?}");
    let succeeded = client.list(query(None, Some(RunStatus::Succeeded), None, None)).await.or_logs(&grid)?;
    assert_eq!(succeeded.runs.len(), finished.len(), "{succeeded:?}");

    // Pages of two: 2 + 2 + 1, newest first, each run once.
    let mut paged = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = client.list(query(Some("echo-once"), None, Some(2), cursor)).await.or_logs(&grid)?;
        assert!(page.runs.len() <= 2, "{page:?}");
        pages += 1;
        paged.extend(page.runs);
        cursor = page.next_cursor;
        if cursor.is_none() || pages > 5 {
            break;
        }
    }
    assert_eq!(pages, 3, "five runs in pages of two: {paged:?}");
    let paged_ids: Vec<RunId> = paged.iter().map(|run| run.run_id.clone()).collect();
    let mut newest_first = finished.clone();
    newest_first.reverse();
    assert_eq!(paged_ids, newest_first, "pages list each run once, newest first");
    assert!(paged.windows(2).all(|pair| pair[0].created_ms >= pair[1].created_ms), "{paged:?}");

    // Running runs (listed from the shards' memory) and ended ones (from the listing
    // index) page together, newest first: the idle runs (in any order, they may share a
    // millisecond), then the finished ones.
    let mut paged = Vec::new();
    let mut cursor = None;
    for _ in 0..5 {
        let page = client.list(query(None, None, Some(3), cursor)).await.or_logs(&grid)?;
        paged.extend(page.runs);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(paged.len(), idle.len() + finished.len(), "{paged:?}");
    let (newest, oldest) = paged.split_at(idle.len());
    let newest_ids: HashSet<&RunId> = newest.iter().map(|run| &run.run_id).collect();
    assert_eq!(newest_ids, idle.iter().collect(), "{paged:?}");
    assert!(newest.iter().all(|run| run.status == RunStatus::Running && run.ended_ms.is_none()), "{paged:?}");
    let oldest_ids: Vec<RunId> = oldest.iter().map(|run| run.run_id.clone()).collect();
    assert_eq!(oldest_ids, newest_first, "{paged:?}");
    assert!(paged.windows(2).all(|pair| pair[0].created_ms >= pair[1].created_ms), "{paged:?}");

    let error = client.list(query(None, None, Some(0), None)).await.expect_err("limit 0 is refused");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    // Filters no run could match are refused before they go to every shard.
    let bad_label = ListRuns { labels: [("Customer ID".to_owned(), "acme".to_owned())].into(), ..Default::default() };
    let long_flow = query(Some(&"f".repeat(100_000)), None, None, None);
    let long_parent = ListRuns { parent: Some(RunId("r".repeat(100_000).into())), ..Default::default() };
    let long_cursor = query(None, None, None, Some("1.".repeat(50_000)));
    for (list, named) in
        [(bad_label, "label key"), (long_flow, "flow:"), (long_parent, "parent"), (long_cursor, "cursor")]
    {
        let error = client.list(list).await.expect_err("refused");
        let refused = refusal(&error);
        assert!(refused.code == ErrorCode::InvalidRequest && refused.message.contains(named), "{named}: {error:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_run_get_name_a_pool_whose_tasks_wait_with_no_worker() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, IDLE_FLOW).await?;
    let run_id = client.start(start("idle", json!({"n": 1}), None)).await.or_logs(&grid)?.run_id;

    let no_worker = "pool idle: 1 task waits and no worker is pulling from it; start a worker for pool `idle`";
    wait_for("`flowgrid status` to name the pool without a worker", RUN_DEADLINE, || async {
        let (ok, stdout, _) = grid.cli(&["status"]).ok()?;
        (ok && stdout.contains(no_worker)).then_some(())
    })
    .await?;
    let (ok, stdout, stderr) = grid.cli(&["run", "get", run_id.as_str()])?;
    assert!(ok && stdout.contains("running"), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("hint: step wait waits on {no_worker}")), "{stderr}");

    grid.start_workers(&["idle"], 4)?;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    // An idle worker keeps a pull request open: the pool has a worker waiting, and no hint.
    let pool = wait_for("the worker's open pull to show", RUN_DEADLINE, || async {
        let (_, stdout, _) = grid.cli(&["--json", "status"]).ok()?;
        let status: serde_json::Value = serde_json::from_str(&stdout).ok()?;
        let pools = status["backlog"]["pools"].as_array()?.clone();
        pools.into_iter().find(|pool| pool["pool"] == "idle" && pool["pulls_waiting"].as_u64() >= Some(1))
    })
    .await?;
    assert_eq!((pool["pending"].as_u64(), pool["in_flight"].as_u64()), (Some(0), Some(0)), "{pool}");
    let (_, stdout, _) = grid.cli(&["status"])?;
    assert!(!stdout.contains("no worker is pulling"), "{stdout}");
    let (_, _, stderr) = grid.cli(&["run", "get", run_id.as_str()])?;
    assert!(!stderr.contains("hint"), "an ended run gets no hint: {stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_started_with_labels_are_listed_by_them() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let labelled = |customer: &str| {
        let mut start = start("echo-once", json!({"n": 1}), None);
        start.labels = [("customer".to_owned(), customer.to_owned()), ("tier".to_owned(), "gold".to_owned())].into();
        start
    };
    let acme = client.start(labelled("acme")).await.or_logs(&grid)?.run_id;
    let other = client.start(labelled("initech")).await.or_logs(&grid)?.run_id;
    for run_id in [&acme, &other] {
        grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
    }
    // One that still runs: a signal step waits.
    deploy(&grid, &client, "name: idle\nsteps:\n  - { id: wait, kind: signal }\n").await?;
    let mut waiting = start("idle", json!({}), None);
    waiting.labels = [("customer".to_owned(), "acme".to_owned())].into();
    let going = client.start(waiting).await.or_logs(&grid)?.run_id;

    let view = client.get(&acme).await.or_logs(&grid)?;
    assert_eq!(view.labels.get("customer").map(String::as_str), Some("acme"), "{view:?}");
    let (ok, stdout, stderr) = grid.cli(&["run", "list", "--label", "customer=acme"])?;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(acme.as_str()) && stdout.contains(going.as_str()), "{stdout}");
    assert!(!stdout.contains(other.as_str()), "{stdout}");
    let query = ListRuns {
        labels: [("customer".to_owned(), "acme".to_owned()), ("tier".to_owned(), "gold".to_owned())].into(),
        ..Default::default()
    };
    let listed: Vec<RunId> = client.list(query).await.or_logs(&grid)?.runs.into_iter().map(|run| run.run_id).collect();
    assert_eq!(listed, vec![acme.clone()], "both labels: only the ended run of acme");
    let (_, stdout, _) = grid.cli(&["run", "get", acme.as_str()])?;
    assert!(stdout.contains("labels    customer=acme, tier=gold"), "{stdout}");
    let (ok, _, stderr) = grid.cli(&["run", "start", "echo-once", "--label", "bad key=x"])?;
    assert!(!ok && stderr.contains("label key"), "{stderr}");
    // A child run carries its parent's labels.
    deploy(&grid, &client, "name: parent\nsteps:\n  - { id: invoke, kind: subflow, flow: echo-once }\n").await?;
    let parent_start = StartRun {
        flow: "parent".into(),
        input: json!({"n": 2}),
        labels: [("customer".to_owned(), "hooli".to_owned())].into(),
        ..Default::default()
    };
    let parent = client.start(parent_start).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    let child = step(&view, "invoke").child_run.clone().expect("a child ran");
    let query = ListRuns { labels: [("customer".to_owned(), "hooli".to_owned())].into(), ..Default::default() };
    let mut listed: Vec<RunId> =
        client.list(query).await.or_logs(&grid)?.runs.into_iter().map(|run| run.run_id).collect();
    listed.sort();
    let mut expected = vec![parent.clone(), child.clone()];
    expected.sort();
    assert_eq!(listed, expected, "the parent and its child");

    // The labels are in the run's history: a run rebuilt after a crash has them.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let view = client.get(&going).await.or_logs(&grid)?;
    assert_eq!((view.status, view.labels.get("customer").cloned()), (RunStatus::Running, Some("acme".to_owned())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_and_paused_by_when_they_started() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let mut ended = Vec::new();
    for n in 0..3 {
        let run_id = client.start(start("echo-once", json!({"n": n}), None)).await.or_logs(&grid)?.run_id;
        let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
        ended.push((view.created_ms, run_id));
        // Each run starts in a millisecond of its own.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let [(at0, run0), (at1, run1), (at2, run2)] = <[(u64, RunId); 3]>::try_from(ended).expect("three runs");
    let listed = |since_ms: Option<u64>, until_ms: Option<u64>| {
        let client = client.clone();
        async move {
            let query = ListRuns { flow: Some("echo-once".into()), since_ms, until_ms, ..Default::default() };
            let runs = client.list(query).await?.runs;
            anyhow::Ok(runs.into_iter().map(|run| run.run_id).collect::<Vec<_>>())
        }
    };
    assert_eq!(listed(Some(at1), Some(at2)).await?, vec![run1.clone()], "the window of the middle run");
    assert_eq!(listed(Some(at1), None).await?, vec![run2.clone(), run1.clone()], "since, newest first");
    assert_eq!(listed(None, Some(at1)).await?, vec![run0.clone()], "until: the end is open");
    assert_eq!(listed(Some(at2 + 1), None).await?, Vec::<RunId>::new(), "after the last run");

    // Pages within a window.
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = ListRuns { since_ms: Some(at0), until_ms: Some(at2 + 1), ..query(None, None, Some(1), cursor) };
        let page = client.list(page).await.or_logs(&grid)?;
        paged.extend(page.runs.into_iter().map(|run| run.run_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, vec![run2.clone(), run1.clone(), run0.clone()], "one run a page, in the window");

    let empty = ListRuns { since_ms: Some(at1), until_ms: Some(at1), ..Default::default() };
    let error = client.list(empty).await.expect_err("an empty window");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    let window = format!("since_ms ({at}) must be before until_ms ({at})", at = rfc3339(at1));
    assert!(error.to_string().contains(&window), "the times as dates: {error}");

    // The command line reads times and durations ago.
    let since = rfc3339(at1);
    let (ok, stdout, stderr) = grid.cli(&["run", "list", "--flow", "echo-once", "--since", &since])?;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(run1.as_str()) && stdout.contains(run2.as_str()), "{stdout}");
    assert!(!stdout.contains(run0.as_str()), "{stdout}");
    let (ok, stdout, _) = grid.cli(&["run", "list", "--flow", "echo-once", "--since", "1h"])?;
    assert!(ok && [&run0, &run1, &run2].iter().all(|run| stdout.contains(run.as_str())), "{stdout}");
    let (ok, _, stderr) = grid.cli(&["run", "list", "--since", "yesterday"])?;
    assert!(!ok && stderr.contains("use e.g. 2026-12-05T10:00:00Z"), "{stderr}");
    let (ok, _, stderr) = grid.cli(&["run", "redrive", run0.as_str(), "--since", "1h"])?;
    assert!(!ok && stderr.contains("go with --flow or --status"), "{stderr}");

    // Running runs (listed from the shard's memory) too: pause only the later of two.
    deploy(&grid, &client, IDLE_FLOW).await?;
    let early = client.start(start("idle", json!({}), None)).await.or_logs(&grid)?.run_id;
    let early_ms = client.get(&early).await.or_logs(&grid)?.created_ms;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = client.start(start("idle", json!({}), None)).await.or_logs(&grid)?.run_id;
    let late_ms = client.get(&late).await.or_logs(&grid)?.created_ms;
    assert!(late_ms > early_ms);
    let (ok, stdout, stderr) = grid.cli(&["run", "pause", "--flow", "idle", "--since", &rfc3339(late_ms)])?;
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "paused 1 of 1 run(s); 0 refused", "only the later run matched");
    assert!(client.get(&late).await.or_logs(&grid)?.paused.is_some(), "the later run is paused");
    assert!(client.get(&early).await.or_logs(&grid)?.paused.is_none(), "the earlier one is not");
    Ok(())
}

/// `ms` as RFC 3339 with milliseconds, as `--since` reads it.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A flow whose runs' input must name a video and list segments.
const SCHEMA_FLOW: &str = r#"
name: checked
input_schema:
  type: object
  required: [video, segments]
  properties:
    video: { type: string, minLength: 1 }
    segments: { type: array, items: { type: object, required: [index] } }
steps:
  - { id: t, kind: transform, output: 'input.video' }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_input_does_not_match_the_input_schema_is_refused_and_starts_nothing() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SCHEMA_FLOW).await?;
    let good = json!({"video": "talk.mp4", "segments": [{"index": 0}]});
    let run_id = client.start(start("checked", good.clone(), None)).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(json!({"t": "talk.mp4"}))));

    let bad = json!({"video": 7, "segments": [{"index": 0}, {"start": 1}]});
    let error = client.start(start("checked", bad.clone(), Some("order-9"))).await.expect_err("refused");
    let refused = refusal(&error);
    assert_eq!(refused.code, ErrorCode::InvalidRequest, "{error:?}");
    assert!(refused.message.contains("does not match the input_schema of flow `checked` (version 1)"), "{error:?}");
    let paths: Vec<&str> = refused.issues.iter().map(|issue| issue.path.as_str()).collect();
    assert_eq!(paths, ["input/video", "input/segments/1"], "{error:?}");
    assert!(!refused.retryable);
    let many = client.start_many(&[start("checked", good, None), start("checked", bad, None)]).await?;
    assert!(many[0].is_ok(), "{many:?}");
    let error = many[1].as_ref().expect_err("the bad one is refused");
    assert_eq!(refusal(error).issues.len(), 2, "{error:?}");
    let runs = client.list(ListRuns { flow: Some("checked".into()), ..Default::default() }).await?.runs;
    assert_eq!(runs.len(), 2, "only the two good inputs started runs: {runs:?}");

    let (ok, _, stderr) = grid.cli(&["run", "start", "checked", "--input", r#"{"segments": "none"}"#])?;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("error: the input does not match the input_schema of flow `checked` (version 1):"),
        "{stderr}"
    );
    assert!(stderr.contains("  input: \"video\" is a required property"), "{stderr}");
    assert!(stderr.contains("  input/segments: \"none\" is not of type \"array\""), "{stderr}");

    // A child run's input is checked too: the parent's step fails with the refusal.
    let parent = "name: parent\nsteps:\n  - { id: invoke, kind: subflow, flow: checked, input: '#{video: \"\"}' }\n";
    deploy(&grid, &client, parent).await?;
    let parent = client.start(start("parent", json!({}), None)).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}");
    let failed = step(&view, "invoke").error.clone().expect("the step's error");
    assert_eq!(failed.code, "invalid_request", "{failed:?}");
    assert!(failed.message.contains("input_schema"), "{failed:?}");

    // A schedule whose input would be refused is refused at deploy.
    let scheduled = SCHEMA_FLOW.replace("steps:", "schedule: { every_ms: 60000, input: { video: a.mp4 } }\nsteps:");
    let error = client.deploy(&scheduled).await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidDefinition, "{error:?}");
    assert_eq!(refusal(&error).issues[0].path, "schedule.input", "{error:?}");

    // A keyed start repeated after a version whose schema refuses its input was deployed
    // (a submit delivered again, a trigger's message) finds its run, as any repeat does.
    let loose = "name: loose\nsteps:\n  - { id: t, kind: transform, output: 'input' }\n";
    deploy(&grid, &client, loose).await?;
    let first = client.start(start("loose", json!({"n": 1}), Some("k-1"))).await.or_logs(&grid)?;
    let strict = loose.replace("steps:", "input_schema: { type: object, required: [m] }\nsteps:");
    deploy(&grid, &client, &strict).await?;
    let again = client.start(start("loose", json!({"n": 1}), Some("k-1"))).await.or_logs(&grid)?;
    assert_eq!((&again.run_id, again.created, again.version), (&first.run_id, false, 1), "{again:?}");
    let error = client.start(start("loose", json!({"n": 1}), Some("k-2"))).await.expect_err("a new start is checked");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    Ok(())
}

/// Runs whose data adds up past what one commit holds, each value within its limit: a
/// chain of nine steps echoing a 1 MB input, and a map whose four items echo 700 KB each.
/// Their ends were refused by the store (the snapshot of the view was in the commit),
/// which reloaded the shard again and again and left the runs running for good; and ten
/// results of 1 MB at once went into one commit. Now they succeed, and their views are
/// rebuilt from their histories when read.
const WIDE_FLOWS: [&str; 3] = [
    r#"
name: wide-chain
steps:
  - { id: s0, kind: task, pool: a, task: echo }
  - { id: s1, kind: task, pool: a, task: echo, after: [s0], input: steps.s0.output }
  - { id: s2, kind: task, pool: a, task: echo, after: [s1], input: steps.s1.output }
  - { id: s3, kind: task, pool: a, task: echo, after: [s2], input: steps.s2.output }
  - { id: s4, kind: task, pool: a, task: echo, after: [s3], input: steps.s3.output }
  - { id: s5, kind: task, pool: a, task: echo, after: [s4], input: steps.s4.output }
  - { id: s6, kind: task, pool: a, task: echo, after: [s5], input: steps.s5.output }
  - { id: s7, kind: task, pool: a, task: echo, after: [s6], input: steps.s6.output }
  - { id: s8, kind: task, pool: a, task: echo, after: [s7], input: steps.s7.output }
"#,
    r#"
name: wide-map
output: steps.each.output
steps:
  - { id: each, kind: map, items: input.items, pool: a, task: echo, input: input.text }
  # Its merged outputs (2.8 MB of text) are read whole by an expression.
  - { id: count, kind: transform, after: [each], output: 'steps.each.output.map(|text| text.len())' }
  # A task input an expression makes over 1 MiB is not sent: the step fails, and its catch takes it.
  - id: too_big
    kind: task
    pool: a
    task: echo
    after: [each]
    input: steps.each.output
    catch: [{ errors: [payload_too_large], next: told }]
  - { id: told, kind: transform, output: steps.too_big.error.code }
"#,
    // Its 2.8 MB output cannot be passed on to a parent: the parent's step fails saying so.
    "name: wide-parent\nsteps:\n  - { id: child, kind: subflow, flow: wide-map }\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_whose_data_adds_up_past_a_commit_end_and_are_read_back() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    for flow in WIDE_FLOWS.iter().chain([&ECHO_FLOW]) {
        deploy(&grid, &client, flow).await?;
    }
    let chain = client.start(start("wide-chain", json!("c".repeat(1_000_000)), None)).await.or_logs(&grid)?;
    let text = "m".repeat(700_000);
    let map =
        client.start(start("wide-map", json!({"items": [0, 1, 2, 3], "text": text}), None)).await.or_logs(&grid)?;
    // Ten runs of 1 MB each at once: their results arrive together.
    let mut echoes = Vec::new();
    for index in 0..10 {
        let input = json!({"index": index, "text": "e".repeat(1_000_000)});
        echoes.push(client.start(start("echo-once", input, None)).await.or_logs(&grid)?.run_id);
    }

    let view = grid.wait_run(&client, &map.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{:?}\n{}", view.error, grid.logs());
    assert_eq!(view.output, Some(json!([text, text, text, text])), "the view rebuilt from the history holds the data");
    assert_eq!(step(&view, "count").output, Some(json!([700_000, 700_000, 700_000, 700_000])));
    assert_eq!(step(&view, "told").output, Some(json!("payload_too_large")), "{view:?}");
    let parent = client.start(start("wide-parent", json!({"items": [0, 1, 2, 3], "text": text}), None)).await?;
    let view = grid.wait_run(&client, &parent.run_id, RUN_DEADLINE).await?;
    let error = view.error.as_ref().map(|error| (error.code.as_str(), error.message.as_str()));
    assert!(
        view.status == RunStatus::Failed
            && error.is_some_and(
                |(code, message)| code == "payload_too_large" && message.contains("succeeded, but its output is")
            ),
        "{:?}",
        view.error
    );
    let brief = wait_for("the chain to end", RUN_DEADLINE, || async {
        let brief = client.get_without_data(&chain.run_id).await.ok()?;
        (brief.status != RunStatus::Running).then_some(brief)
    })
    .await
    .or_logs(&grid)?;
    assert_eq!(brief.status, RunStatus::Succeeded, "{:?}\n{}", brief.error, grid.logs());
    assert!(brief.steps.iter().all(|step| step.status == StepStatus::Succeeded), "{brief:?}");
    // Its view (11 MB) is over the server's max_payload: refused as such, not lost.
    let refused = client.get(&chain.run_id).await.expect_err("an 11 MB view");
    assert_eq!(refusal(&refused).code, ErrorCode::PayloadTooLarge, "{refused:?}");
    for run_id in &echoes {
        let brief = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(brief.status, RunStatus::Succeeded, "{:?}\n{}", brief.error, grid.logs());
    }
    assert!(!grid.logs().contains("commit failed"), "no commit was refused:\n{}", grid.logs());
    Ok(())
}

/// A message NATS would refuse is refused with `payload_too_large` naming the server's
/// `max_payload`, on the way in (a start) and on the way out (a run's view, which holds
/// its input and every output): not a transport error, not a request that times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_servers_max_payload_are_refused_naming_it() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("max_payload: 1MB")?;
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 4)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;

    // 400 KB in, echoed out: the run ends, and its view (input, the step's output and the
    // run's output) is over 1 MB.
    let text = "y".repeat(400 * 1024);
    let run = client.start(start("echo-once", json!({"text": text}), None)).await.or_logs(&grid)?;
    // Its end is read from the list: its view is what cannot be sent.
    wait_for("the run to end", RUN_DEADLINE, || async {
        let listed = client.list(ListRuns { flow: Some("echo-once".into()), ..Default::default() }).await.ok()?;
        listed.runs.first().filter(|run| run.status == RunStatus::Succeeded).map(|_| ())
    })
    .await
    .or_logs(&grid)?;
    let error = client.get(&run.run_id).await.expect_err("a view over max_payload");
    let refused = refusal(&error);
    assert_eq!(refused.code, ErrorCode::PayloadTooLarge, "{refused:?}");
    assert!(refused.message.contains("the reply is") && refused.message.contains("max_payload"), "{refused:?}");
    // Where the run is can still be read, without its data; `run get` falls back to it.
    let brief = client.get_without_data(&run.run_id).await.or_logs(&grid)?;
    assert_eq!((brief.status, &brief.input, &brief.output), (RunStatus::Succeeded, &json!(null), &None), "{brief:?}");
    assert!(brief.data_left_out, "{brief:?}");
    assert_eq!(step(&brief, "echo").status, StepStatus::Succeeded);
    let (ok, stdout, stderr) = grid.cli(&["run", "get", run.run_id.as_str()])?;
    assert!(ok && stdout.contains("succeeded"), "{stdout}\n{stderr}");
    assert!(stderr.contains("note: the run's input and outputs are left out"), "{stderr}");
    let (ok, stdout, stderr) = grid.cli(&["--json", "run", "get", run.run_id.as_str()])?;
    let printed: serde_json::Value =
        anyhow::Context::with_context(serde_json::from_str(&stdout), || format!("{stdout}\n{stderr}"))?;
    assert!(ok && printed["data_left_out"] == json!(true), "{stdout}\n{stderr}");
    // Waiting for it, or watching it, ends as it did, not with the view's refusal.
    let input = tempfile::NamedTempFile::new()?;
    std::fs::write(input.path(), json!({"text": text}).to_string())?;
    let input_path = input.path().to_str().expect("a UTF-8 temporary path");
    let (ok, stdout, stderr) = grid.cli(&["run", "start", "echo-once", "--input-file", input_path, "--wait"])?;
    assert!(ok && stdout.contains("succeeded"), "{stdout}\n{stderr}");
    assert!(stderr.contains("note: the run's input and outputs are left out"), "{stderr}");
    let (ok, stdout, stderr) = grid.cli(&["run", "watch", run.run_id.as_str()])?;
    assert!(ok && stdout.contains("succeeded"), "{stdout}\n{stderr}");
    assert!(stderr.contains("its steps' progress reports are left out"), "{stderr}");
    let ui = crate::ui::start_ui(&mut grid, &[]).await?;
    let (status, page) = flowgrid_tests::http_get(&ui, &format!("/runs/{}", run.run_id))?;
    assert!(status == 200 && page.contains("Its input and outputs are left out (the reply is"), "{status} {page}");
    let (status, body) = flowgrid_tests::http_get(&ui, &format!("/api/runs/{}", run.run_id))?;
    let read: serde_json::Value = serde_json::from_str(&body)?;
    assert!(status == 200 && read["data_left_out"] == json!(true), "{status} {body}");
    assert_eq!(read["status"], json!("succeeded"), "{body}");
    // With a second coordinator, reads reach the run's shard through either: the view is
    // refused, or crosses between them without its data, whichever took the request.
    grid.start_coordinator().await?;
    for _ in 0..8 {
        let error = client.get(&run.run_id).await.expect_err("a view over max_payload");
        assert_eq!(refusal(&error).code, ErrorCode::PayloadTooLarge, "{error:?}");
        let brief = client.get_without_data(&run.run_id).await.or_logs(&grid)?;
        assert!(brief.data_left_out && brief.status == RunStatus::Succeeded, "{brief:?}");
    }

    let text = "y".repeat(1_100 * 1024);
    let error = client.start(start("echo-once", json!({"text": text}), None)).await.expect_err("a start over 1 MB");
    let refused = refusal(&error);
    assert_eq!(refused.code, ErrorCode::PayloadTooLarge, "{refused:?}");
    assert!(refused.message.contains("the request is") && refused.message.contains("max_payload"), "{refused:?}");
    Ok(())
}

/// A listing whose filter matches few of a shard's runs reads at most 10,000 entries of its
/// listing index per request: the page then ends where the reading stopped, with a cursor,
/// and the next pages find the older matches (a short page without a cursor used to end
/// the listing there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_matches_few_runs_goes_on_past_what_one_request_reads() -> anyhow::Result<()> {
    const COMMON_RUNS: usize = 10_100;
    let mut grid = Grid::start_nats()?;
    // One shard: every run in the one listing index.
    grid.shards = 1;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, "name: rare\nsteps:\n  - { id: done, kind: succeed }\n").await?;
    deploy(&grid, &client, "name: common\nsteps:\n  - { id: done, kind: succeed }\n").await?;
    let rare = client.start(start("rare", json!({}), None)).await.or_logs(&grid)?.run_id;
    grid.wait_run(&client, &rare, RUN_DEADLINE).await?;
    let batch: Vec<StartRun> = (0..1_000).map(|_| start("common", json!({}), None)).collect();
    for chunk in 0..COMMON_RUNS.div_ceil(batch.len()) {
        let count = (COMMON_RUNS - chunk * batch.len()).min(batch.len());
        for started in client.start_many(&batch[..count]).await.or_logs(&grid)? {
            started.or_logs(&grid)?;
        }
    }
    let running = ListRuns { status: Some(RunStatus::Running), ..Default::default() };
    wait_for("every run to end", RUN_DEADLINE, || async {
        client.list(running.clone()).await.ok().filter(|list| list.runs.is_empty()).map(|_| ())
    })
    .await
    .or_logs(&grid)?;

    let mut pages = Vec::new();
    let mut cursor = None;
    for _ in 0..5 {
        let page = client.list(query(Some("rare"), None, Some(10), cursor)).await.or_logs(&grid)?;
        pages.push(page.runs.iter().map(|run| run.run_id.clone()).collect::<Vec<_>>());
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages, vec![vec![], vec![rare]], "a page cut short, then the older match");
    Ok(())
}

/// A start without an idempotency key is not safe to repeat: it is retried only while no
/// coordinator takes it, and the try that reaches one waits the whole request timeout,
/// though the retry budget is nearly spent. Before, that try waited what the budget had
/// left (0.45 s here), and a coordinator that came up late and answered in a second was taken
/// for one that may have started the run: the caller could not tell whether it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_not_safe_to_repeat_waits_its_whole_timeout_on_a_late_try() -> anyhow::Result<()> {
    use futures::StreamExt;
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.start");
    let client = grid.client().await?.with_retry_budget(Duration::from_secs(2));
    let responder = tokio::spawn(async move {
        // No coordinator for the first second of the 2 s budget (the client tries at 0, 50,
        // 150, 350 and 750 ms, then at 1,550 ms, with 450 ms of the budget left); then one
        // that takes a second to answer.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let mut requests = nats.subscribe(subject).await?;
        let request = tokio::time::timeout(Duration::from_secs(5), requests.next()).await?;
        let request = request.ok_or_else(|| anyhow::anyhow!("no request"))?;
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let started = RunStarted { run_id: RunId("late".into()), flow: "f".into(), version: 1, created: true };
        let reply = encode(Encoding::MsgPack, &Reply::Ok(started))?;
        nats.publish(request.reply.expect("a request"), reply.into()).await?;
        nats.flush().await?;
        anyhow::Ok(())
    });
    let started = client.start(StartRun { flow: "f".into(), ..Default::default() }).await;
    responder.await??;
    assert_eq!(started?.run_id.as_str(), "late", "the late coordinator's answer is the call's");
    Ok(())
}

/// A batched start retries for its batcher's budget, not a budget per round: a round sent
/// late in it (to a grid whose coordinator went away meanwhile) retries for what is left.
/// Before, each round's request got a whole budget of its own, and the start here returned
/// after about twice the budget (4 s), not once it was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_start_ends_when_its_budget_is_spent_however_late_its_last_round() -> anyhow::Result<()> {
    use futures::StreamExt;
    const BUDGET: Duration = Duration::from_secs(2);
    // The rounds at 0, 50, 150, 350, 750 and 1,550 ms are refused as overloaded; the one at
    // 2 s (the budget's end) finds no coordinator.
    const OVERLOADED_ROUNDS: usize = 6;
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.start_many");
    let mut requests = nats.subscribe(subject).await?;
    nats.flush().await?;
    let responder = tokio::spawn(async move {
        for _ in 0..OVERLOADED_ROUNDS {
            let request = tokio::time::timeout(Duration::from_secs(10), requests.next()).await?;
            let request = request.ok_or_else(|| anyhow::anyhow!("no request"))?;
            let starts: flowgrid_proto::StartRuns = decode(Encoding::MsgPack, &request.payload)?;
            let refused = Reply::Error(flowgrid_sdk::ApiError::new(ErrorCode::Overloaded, "too many runs"));
            let results = starts.runs.iter().map(|_| refused.clone()).collect();
            let reply = encode(Encoding::MsgPack, &Reply::Ok(flowgrid_proto::RunsStarted { results }))?;
            nats.publish(request.reply.expect("a request"), reply.into()).await?;
        }
        // The coordinator goes away.
        requests.unsubscribe().await?;
        nats.flush().await?;
        anyhow::Ok(())
    });
    let client = grid.client().await?.with_retry_budget(BUDGET);
    let starts = flowgrid_sdk::StartBatcher::new(client, 16, 1);
    let sent = std::time::Instant::now();
    let started = starts.start(StartRun { flow: "f".into(), ..Default::default() }).await;
    let took = sent.elapsed();
    responder.await??;
    let error = started.err().ok_or_else(|| anyhow::anyhow!("a start nobody took started"))?;
    assert!(took < BUDGET + Duration::from_secs(1), "the start returned {took:?} after it was sent: {error}");
    assert!(error.is_no_responders(), "a batched start says no coordinator answers, as a start does: {error:?}");
    assert!(error.to_string().starts_with("no coordinator answers on flowgrid.api.run.start_many"), "{error}");
    Ok(())
}

/// A start without an idempotency key that timed out says how many times it was sent and
/// for how long in all, and, as it is not safe to send again blindly, that the grid may
/// have applied it. Before, it gave the last try's time only, and said nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_timed_out_says_its_tries_and_that_it_may_have_started() -> anyhow::Result<()> {
    use futures::StreamExt;
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.start");
    let mut requests = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;
    let responder = tokio::spawn(async move {
        // The first try is refused as overloaded; the second gets no answer.
        let request = tokio::time::timeout(Duration::from_secs(10), requests.next()).await?;
        let request = request.ok_or_else(|| anyhow::anyhow!("no request"))?;
        let refused = Reply::<RunStarted>::Error(flowgrid_sdk::ApiError::new(ErrorCode::Overloaded, "too many runs"));
        nats.publish(request.reply.expect("a request"), encode(Encoding::MsgPack, &refused)?.into()).await?;
        let again = tokio::time::timeout(Duration::from_secs(10), requests.next()).await?;
        anyhow::ensure!(again.is_some(), "no second try");
        anyhow::Ok(())
    });
    let client = grid.client().await?.with_request_timeout(Duration::from_millis(300));
    let started = client.start(StartRun { flow: "f".into(), ..Default::default() }).await;
    responder.await??;
    let error = started.err().ok_or_else(|| anyhow::anyhow!("a start nobody answered started"))?;
    let message = error.to_string();
    assert!(message.starts_with(&format!("request on {subject} (2 tries) timed out after ")), "{message}");
    assert!(
        error.may_have_been_applied()
            && message.ends_with(
                ": the grid may have applied it: read the run before sending it again, or give starts an \
                 idempotency_key"
            ),
        "{message}"
    );
    Ok(())
}

/// Arguments a command cannot take together exit 2, as clap's own usage errors; and under
/// `--json` every failure is a JSON answer on stdout, not only the grid's refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_mistakes_exit_2_and_every_failure_answers_json_under_json() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let run = |args: &[&str], nats_url: &str| {
        std::process::Command::new(flowgrid_tests::flowgrid_bin())
            .args(["--nats-url", nats_url, "--prefix", &grid.prefix])
            .args(args)
            .output()
    };
    let output = run(&["run", "redrive", "a", "b", "--wait"], &grid.nats_url)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--wait waits for one run"), "{stderr}");
    let output = run(&["--json", "run", "redrive", "a", "b", "--wait"], &grid.nats_url)?;
    let answer: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
    // NATS out of reach: exit 1, and a JSON answer that says so.
    let output = run(&["--json", "run", "get", "some-run"], "nats://127.0.0.1:1")?;
    assert_eq!(output.status.code(), Some(1));
    let answer: Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| anyhow::anyhow!("{error}: {:?}", String::from_utf8_lossy(&output.stdout)))?;
    assert_eq!(
        (answer["error"]["code"].as_str(), answer["error"]["retryable"].as_bool()),
        (Some("unavailable"), Some(true)),
        "{answer}"
    );
    Ok(())
}

/// A `run.start_many` whose refusals, whole, would make a reply larger than NATS takes:
/// 999 inputs with 10 issues of about 470 bytes each, then 1,000 names of no flow made of
/// control characters (escaped where echoed). The reply comes all the same, with the good
/// run's id; the refusals past half a MiB of it come without their issues, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_many_reply_keeps_within_a_message_however_large_its_refusals() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("max_payload: 1MB")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    let expected = "e".repeat(450);
    let strict = format!(
        "name: strict\ninput_schema: {{ type: array, items: {{ const: {expected} }} }}\nsteps:\n  - {{ id: t, kind: \
         transform, output: 'input' }}\n"
    );
    deploy(&grid, &client, &strict).await?;
    let mut starts = vec![start("strict", json!(vec![0; 10]), None); 999];
    starts.push(start("strict", json!([]), None));
    let outcomes = client.start_many(&starts).await.or_logs(&grid)?;
    let good = outcomes[999].as_ref().map_err(|error| anyhow::anyhow!("{error}\n{}", grid.logs()))?;
    let view = grid.wait_run(&client, &good.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let refused: Vec<_> = outcomes[..999].iter().map(|outcome| refusal(outcome.as_ref().unwrap_err())).collect();
    assert!(refused.iter().all(|refused| refused.code == ErrorCode::InvalidRequest), "{:?}", refused[0]);
    assert_eq!(refused[0].issues.len(), 10, "the first refusals come whole: {:?}", refused[0]);
    let last = refused[998];
    assert!(last.issues.is_empty() && last.message.contains("10 issues left out"), "{last:?}");

    let nameless = start(&"\u{1}".repeat(800), json!({}), None);
    let outcomes = client.start_many(&vec![nameless; 1_000]).await.or_logs(&grid)?;
    for outcome in &outcomes {
        let refused = refusal(outcome.as_ref().unwrap_err());
        assert_eq!(refused.code, ErrorCode::NotFound, "{refused:?}");
        assert!(refused.message.len() < 1_200, "the name is cut: {} bytes", refused.message.len());
    }
    Ok(())
}

/// A history page after a record of a run that never started is `not_found`, as its first
/// page is; a run's history read past its last record is an empty page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_of_an_unknown_run_is_not_found_from_any_record_on() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let made_up = RunId("no-such-run".into());
    for after in [None, Some(5), Some(u64::MAX)] {
        let error = client.history(&made_up, after, None).await.expect_err("no such run");
        assert_eq!(refusal(&error).code, ErrorCode::NotFound, "after {after:?}: {error:?}");
    }
    deploy(&grid, &client, "name: quick\nsteps:\n  - { id: t, kind: transform, output: 'input' }\n").await?;
    let run_id = client.start(start("quick", json!({"n": 1}), None)).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    for after in [Some(1_000), Some(u64::MAX)] {
        let page = client.history(&run_id, after, None).await.or_logs(&grid)?;
        assert!(page.records.is_empty() && page.next.is_none(), "after {after:?}: {page:?}");
    }
    Ok(())
}

/// 300 runs with 16 labels of the largest size (about 5.3 KB each, 1.6 MB in all) listed
/// 1,000 at a time on a server whose max_payload is 1 MB: the listing comes in pages that
/// each fit a message, each but the last with a `next_cursor`, and lists every run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_list_of_runs_with_large_labels_comes_in_pages_that_fit_a_message() -> anyhow::Result<()> {
    use flowgrid_model::labels::{LABELS_MAX, LABEL_KEY_BYTES_MAX, LABEL_VALUE_BYTES_MAX};

    let mut grid = Grid::start_nats_with_config("max_payload: 1MB")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, "name: quick\nsteps:\n  - { id: t, kind: transform, output: 'input' }\n").await?;
    let mut labelled = start("quick", json!({}), None);
    labelled.labels = (0..LABELS_MAX)
        .map(|n| (format!("{n:0>width$}", width = LABEL_KEY_BYTES_MAX), "v".repeat(LABEL_VALUE_BYTES_MAX)))
        .collect();
    let mut started = HashSet::new();
    // 50 a request: 300 at once would be a request over max_payload.
    for _ in 0..6 {
        for outcome in client.start_many(&vec![labelled.clone(); 50]).await.or_logs(&grid)? {
            started.insert(outcome.map_err(|error| anyhow::anyhow!("{error}"))?.run_id);
        }
    }
    assert_eq!(started.len(), 300);

    let mut listed = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = client.list(query(Some("quick"), None, Some(1_000), cursor)).await.or_logs(&grid)?;
        pages += 1;
        listed.extend(page.runs.into_iter().map(|run| run.run_id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
        assert!(pages < 300, "a page of no run, again and again: {cursor:?}");
    }
    assert!(pages > 2, "1.6 MB of runs in {pages} pages");
    assert_eq!(listed.len(), 300, "each run listed once: {} listed in {pages} pages", listed.len());
    assert_eq!(listed.into_iter().collect::<HashSet<_>>(), started);
    Ok(())
}

/// `run list` prints its table alone on stdout; where the next page starts goes to stderr
/// with the notes, and names the `--cursor` that lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_list_says_on_stderr_where_its_next_page_starts() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, IDLE_FLOW).await?;
    let mut started = HashSet::new();
    for _ in 0..2 {
        started.insert(client.start(start("idle", json!({}), None)).await.or_logs(&grid)?.run_id.to_string());
    }
    let (ok, stdout, stderr) = grid.cli(&["run", "list", "--flow", "idle", "--limit", "1"])?;
    assert!(ok && !stdout.contains("cursor") && stdout.lines().count() == 2, "{stdout}");
    let cursor = stderr.split("--cursor ").nth(1).and_then(|rest| rest.split_whitespace().next());
    let cursor = cursor.unwrap_or_else(|| panic!("no --cursor on stderr: {stderr}"));
    let (ok, next, stderr) = grid.cli(&["run", "list", "--flow", "idle", "--limit", "1", "--cursor", cursor])?;
    assert!(ok, "{stderr}");
    let listed: HashSet<String> = [&stdout, &next]
        .iter()
        .filter_map(|table| table.lines().nth(1).and_then(|row| row.split_whitespace().next()).map(str::to_owned))
        .collect();
    assert_eq!(listed, started, "one run on each page:\n{stdout}{next}");
    Ok(())
}

/// `run history` of a history longer than a page prints it page by page: the whole of it,
/// in one table whose pages line up or in one JSON answer as `run.history` gives a page,
/// and once its reader has gone (`| head`) it ends at the next page, as the shell's
/// commands do (exit 141), not after reading every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_history_is_printed_page_by_page_and_stops_once_its_reader_is_gone() -> anyhow::Result<()> {
    use std::io::BufRead;

    // Over a page of 1,000 records, and lines long enough (about 200 bytes) that the first
    // page alone fills a pipe.
    const ITEMS: usize = 1_100;
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let flow = "name: many-records\nsteps:\n  - { id: each, kind: map, items: input.items, pool: a, task: echo }\n";
    deploy(&grid, &client, flow).await?;
    let items: Vec<Value> = (0..ITEMS).map(|item| json!({"item": item, "text": "x".repeat(150)})).collect();
    let run_id = client.start(start("many-records", json!({"items": items}), None)).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let mut records = Vec::new();
    let mut after = None;
    loop {
        let page = client.history(&run_id, after, None).await.or_logs(&grid)?;
        records.extend(page.records);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(records.len() > 1_000, "{} records", records.len());

    let (ok, stdout, stderr) = grid.cli(&["--json", "run", "history", run_id.as_str()])?;
    assert!(ok, "{stderr}");
    let whole = flowgrid_proto::RunHistory { run_id: run_id.clone(), records: records.clone(), next: None };
    assert_eq!(serde_json::from_str::<Value>(&stdout)?, serde_json::to_value(&whole)?);

    let (ok, stdout, stderr) = grid.cli(&["run", "history", run_id.as_str()])?;
    assert!(ok && stdout.lines().count() == records.len() + 1, "{stderr}");
    // Where the third column starts: after the first two and the spaces after each.
    let third_column = |line: &str| {
        let mut at = 0;
        for _ in 0..2 {
            at += line[at..].find(' ')?;
            at += line[at..].find(|character: char| character != ' ')?;
        }
        Some(at)
    };
    let columns: HashSet<Option<usize>> = stdout.lines().map(third_column).collect();
    assert_eq!(columns.len(), 1, "every line's WHAT at one column: {columns:?}");

    let mut cli = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "run", "history", run_id.as_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut header = String::new();
    // The reader reads one line and goes: the pipe closes as it drops.
    std::io::BufReader::new(cli.stdout.take().expect("a piped stdout")).read_line(&mut header)?;
    assert!(header.starts_with("SEQ"), "{header}");
    let status = cli.wait()?;
    assert_eq!(status.code(), Some(141), "it ended as a command whose reader went away");
    Ok(())
}

/// A batch whose reply the grid refused as too large for one message (`payload_too_large`,
/// which a coordinator sends in place of a reply NATS would not carry, after it applied
/// every start): a responder plays that grid for batches of more than 4 starts. The starts
/// without a key are not sent again (each may have started, and says so); those with one
/// go again in smaller batches and learn their runs. Before, the batcher took the refusal
/// for one of a request too large to send and sent both halves: each keyless start twice.
#[tokio::test]
async fn a_batch_whose_reply_was_too_large_sends_no_start_without_a_key_again() -> anyhow::Result<()> {
    use futures::StreamExt;
    /// Starts of a batch above which the responder refuses the reply as too large.
    const REPLY_STARTS_MAX: usize = 4;
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.start_many");
    let mut requests = nats.subscribe(subject).await?;
    nats.flush().await?;
    // The `n` of each start the responder was sent, as often as it was sent.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let responder = tokio::spawn({
        let received = received.clone();
        async move {
            while let Some(request) = requests.next().await {
                let batch: flowgrid_proto::StartRuns = decode(Encoding::MsgPack, &request.payload)?;
                received.lock().expect("not poisoned").extend(batch.runs.iter().map(|start| start.input["n"].clone()));
                let reply = if batch.runs.len() > REPLY_STARTS_MAX {
                    let message = "the reply is 2000000 bytes, over the 1044480 bytes a message may carry";
                    encode(
                        Encoding::MsgPack,
                        &Reply::<()>::Error(flowgrid_sdk::ApiError::new(ErrorCode::PayloadTooLarge, message)),
                    )?
                } else {
                    let results = batch
                        .runs
                        .iter()
                        .map(|start| {
                            let run_id = match &start.idempotency_key {
                                Some(key) => RunId::from_idempotency_key(&start.flow, key),
                                None => RunId(format!("run-{}", start.input["n"]).into()),
                            };
                            Reply::Ok(RunStarted { run_id, flow: start.flow.clone(), version: 1, created: true })
                        })
                        .collect();
                    encode(Encoding::MsgPack, &Reply::Ok(flowgrid_proto::RunsStarted { results }))?
                };
                nats.publish(request.reply.expect("a request"), reply.into()).await?;
            }
            anyhow::Ok(())
        }
    });
    let client = grid.client().await?;
    let batcher = flowgrid_sdk::StartBatcher::new(client, 256, 1);
    // Odd starts carry a key. On this one-thread runtime every start joins the queue
    // before the batcher takes any: they share one batch of 8.
    let key = |n: u64| (n % 2 == 1).then(|| format!("order-{n}"));
    let outcomes =
        futures::future::join_all((0..8).map(|n| batcher.start(start("f", json!({"n": n}), key(n).as_deref())))).await;
    responder.abort();
    let received = received.lock().expect("not poisoned").clone();
    for (n, outcome) in (0..8).zip(&outcomes) {
        match key(n) {
            Some(key) => {
                let started = outcome.as_ref().map_err(|error| anyhow::anyhow!("start {n}: {error}"))?;
                assert_eq!(started.run_id, RunId::from_idempotency_key("f", &key), "{outcomes:?}");
            }
            None => {
                let sent = received.iter().filter(|sent| **sent == json!(n)).count();
                assert_eq!(sent, 1, "start {n} has no key: sent {sent} times ({received:?})");
                let error = outcome.as_ref().expect_err("a start whose reply was lost has no run id to give");
                assert!(error.may_have_been_applied(), "start {n}: {error:?}");
                assert!(error.to_string().contains("the reply is 2000000 bytes"), "{error}");
            }
        }
    }
    Ok(())
}

/// One start nested too deep for the grid to decode inside a batch (126 levels of its input,
/// and the batch's own 3, over the 128 the grid reads) among 10 others that the grid takes:
/// only that one is refused. Before, the grid refused the whole request as one it could not
/// decode, and each of the 10 others got that refusal.
#[tokio::test]
async fn a_start_too_deep_to_decode_in_a_batch_is_refused_alone() -> anyhow::Result<()> {
    const DEEP_AT: usize = 5;
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, IDLE_FLOW).await?;
    let deep = (0..126).fold(json!(1), |inner, _| json!([inner]));
    let batcher = flowgrid_sdk::StartBatcher::new(client.clone(), 256, 1);
    // On this one-thread runtime every start joins the queue before the batcher takes any:
    // they share one batch.
    let outcomes = futures::future::join_all((0..11).map(|n| {
        let input = if n == DEEP_AT { deep.clone() } else { json!({"n": n}) };
        batcher.start(start("idle", input, None))
    }))
    .await;
    for (n, outcome) in outcomes.iter().enumerate() {
        if n == DEEP_AT {
            let error = outcome.as_ref().expect_err("an input nested 126 deep is refused");
            assert_eq!(refusal(error).code, ErrorCode::InvalidRequest, "{error:?}");
        } else {
            outcome.as_ref().map_err(|error| anyhow::anyhow!("start {n}: {error}\n{}", grid.logs()))?;
        }
    }
    let runs = client.list(ListRuns { flow: Some("idle".into()), ..Default::default() }).await.or_logs(&grid)?;
    assert_eq!(runs.runs.len(), 10, "{runs:?}");
    Ok(())
}

/// A batch of a start with an idempotency key and one without, that timed out with no
/// budget left to send it again: the start with the key is told what `Client::start` would
/// tell it (the timeout), not that the grid may have applied it and to add a key.
#[tokio::test]
async fn a_keyed_start_of_a_batch_that_timed_out_is_not_told_to_add_a_key() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.start_many");
    // Takes every request and answers none.
    let _silent = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;
    let client =
        grid.client().await?.with_request_timeout(Duration::from_millis(300)).with_retry_budget(Duration::ZERO);
    let batcher = flowgrid_sdk::StartBatcher::new(client, 256, 1);
    // On this one-thread runtime both starts join the queue before the batcher takes any.
    let (keyed, keyless) = futures::join!(
        batcher.start(start("f", json!({}), Some("order-7"))),
        batcher.start(start("f", json!({}), None))
    );
    let keyless = keyless.expect_err("nobody answered");
    assert!(keyless.may_have_been_applied(), "{keyless:?}");
    let keyed = keyed.expect_err("nobody answered");
    let message = keyed.to_string();
    assert!(message.starts_with(&format!("request on {subject} (1 try) timed out after ")), "{message}");
    assert!(!keyed.may_have_been_applied() && !message.contains("idempotency_key"), "{message}");
    Ok(())
}
