//! Subflow steps: a run starts a child run of another flow (or one per item) and goes on
//! with its output; a failed child reaches the parent's catch, a refused one fails the step with the
//! reason, a flow that calls itself stops at the depth limit, cancelling the parent
//! cancels the child, and a child's start and end reach their runs across coordinator
//! crashes.

use std::time::Duration;

use flowgrid_model::{shard_of, ParentRef};
use flowgrid_proto::ChildRunEnded;
use flowgrid_sdk::{ErrorCode, ListRuns, RunId, RunStatus, StartRun, StepStatus, TaskError};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

/// The child: doubles `value` on pool `a`.
const DOUBLER: &str = r#"
name: doubler
output: 'steps.double.output'
steps:
  - { id: double, kind: task, pool: a, task: double, input: '#{ value: input.n }' }
"#;

/// The parent: runs the doubler on its input, then adds one to the child's output; a
/// child that fails goes to `fallback`.
const PARENT: &str = r#"
name: parent
steps:
  - id: invoke
    kind: subflow
    flow: doubler
    input: '#{ n: input.n }'
    catch: [{ errors: [boom, not_found], next: fallback }]
  - { id: after, kind: transform, after: [invoke], output: 'steps.invoke.output.value + 1' }
  - { id: fallback, kind: transform, output: '"caught " + steps.invoke.error.code' }
"#;

/// A child that waits for a signal `approve`, then echoes its data.
const WAITER: &str = r#"
name: waiter
output: 'steps.approve.output'
steps:
  - { id: approve, kind: signal }
"#;

/// A parent of the waiter.
const WAITING_PARENT: &str = r#"
name: waiting-parent
output: 'steps.invoke.output'
steps:
  - { id: invoke, kind: subflow, flow: waiter }
"#;

fn start(flow: &str, input: serde_json::Value) -> StartRun {
    StartRun { flow: flow.into(), input, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subflow_step_runs_its_child_and_a_failed_or_refused_child_reaches_the_catch() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, DOUBLER).await?;
    deploy(&grid, &client, PARENT).await?;

    let run_id = client.start(start("parent", json!({"n": 21}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "invoke").output, Some(json!({"value": 42})), "the child's output");
    assert_eq!(view.output, Some(json!({"after": 43})), "{view:?}");
    let child_id = step(&view, "invoke").child_run.clone().expect("the step names its child");
    let child = client.get(&child_id).await.or_logs(&grid)?;
    assert_eq!((child.flow.as_str(), child.status), ("doubler", RunStatus::Succeeded), "{child:?}");
    let parent = child.parent.expect("the child names its parent");
    assert_eq!((parent.run_id, parent.step.as_str(), parent.depth), (run_id.clone(), "invoke", 1));
    let (ok, stdout, _) = grid.cli(&["run", "get", child_id.as_str()])?;
    assert!(ok && stdout.contains(&format!("parent    {run_id} (step invoke)")), "{stdout}");

    // A new version of the child whose task fails with code `boom`: the parent's catch takes it.
    let failing = DOUBLER.replace(
        "task: double, input: '#{ value: input.n }'",
        r#"task: fail, input: '#{ code: "boom", retryable: false }'"#,
    );
    deploy(&grid, &client, &failing).await?;
    let run_id = client.start(start("parent", json!({"n": 1}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let invoke = step(&view, "invoke");
    assert_eq!((invoke.status, invoke.caught), (StepStatus::Failed, true), "{invoke:?}");
    assert_eq!(step(&view, "fallback").output, Some(json!("caught boom")), "{view:?}");
    assert!(invoke.error.as_ref().unwrap().message.contains("child run"), "{invoke:?}");

    // A child flow that does not exist: the step fails with `not_found`, which is caught.
    deploy(&grid, &client, &PARENT.replace("name: parent", "name: orphan").replace("flow: doubler", "flow: nowhere"))
        .await?;
    let run_id = client.start(start("orphan", json!({"n": 1}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(step(&view, "fallback").output, Some(json!("caught not_found")), "{view:?}\n{}", grid.logs());
    assert!(step(&view, "invoke").error.as_ref().unwrap().message.contains("nowhere"), "{view:?}");
    assert_eq!(step(&view, "invoke").child_run, None, "a child that never started is not named");

    // A child whose flow's input_schema refuses the input: the step's error names the problem.
    let strict = "name: strict\ninput_schema: {type: object, required: [y]}\nsteps:\n  - { id: t, kind: transform, output: '1' }\n";
    deploy(&grid, &client, strict).await?;
    deploy(&grid, &client, &PARENT.replace("name: parent", "name: picky").replace("flow: doubler", "flow: strict"))
        .await?;
    let run_id = client.start(start("picky", json!({"n": 1}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    let message = &step(&view, "invoke").error.as_ref().expect("the step failed").message;
    assert!(message.contains("input_schema") && message.contains("required property"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subflow_step_with_items_runs_one_child_per_item() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, DOUBLER).await?;
    let fan = "name: fan\nsteps:\n  - { id: each, kind: subflow, flow: doubler, items: 'input.numbers', \
               input: '#{ n: item }', max_concurrency: 2 }\n";
    deploy(&grid, &client, fan).await?;
    let run_id = client.start(start("fan", json!({"numbers": [1, 2, 3, 4, 5]}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let outputs = json!([{"value": 2}, {"value": 4}, {"value": 6}, {"value": 8}, {"value": 10}]);
    assert_eq!(step(&view, "each").output, Some(outputs), "the children's outputs in item order");
    let counts = step(&view, "each").items.expect("item counts");
    assert_eq!((counts.total, counts.succeeded), (5, 5));
    let third = ParentRef::child_run_id("doubler", &run_id, "each", Some(2), 0);
    let child = client.get(&third).await.or_logs(&grid)?;
    let parent = child.parent.expect("the child names its parent");
    assert_eq!((parent.run_id, parent.item, child.input), (run_id.clone(), Some(2), json!({"n": 3})));

    // The children are listed by their parent, through the API and the CLI.
    let query = ListRuns { parent: Some(run_id.clone()), ..Default::default() };
    let children = client.list(query).await.or_logs(&grid)?.runs;
    assert_eq!(children.len(), 5, "{children:?}");
    assert!(children.iter().all(|child| child.flow == "doubler" && child.parent.as_ref() == Some(&run_id)));
    assert!(children.iter().any(|child| child.run_id == third));
    let (ok, stdout, stderr) = grid.cli(&["run", "list", "--parent", run_id.as_str()])?;
    assert!(ok && stdout.contains(third.as_str()) && stdout.matches("doubler@1").count() == 5, "{stdout}\n{stderr}");
    let (_, stdout, _) = grid.cli(&["run", "list", "--parent", third.as_str()])?;
    assert!(!stdout.contains("doubler@1"), "a run without children lists none: {stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_that_calls_itself_stops_at_the_depth_limit() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, "name: forever\nsteps:\n  - { id: again, kind: subflow, flow: forever }\n").await?;
    let run_id = client.start(start("forever", json!({}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let error = view.error.expect("an error");
    assert_eq!(error.code, "invalid_request", "{error:?}");
    assert!(error.message.contains("nest 8 deep at most"), "{error:?}");
    // Eight levels below the top run, each failed with the same cause.
    let mut depth = 0;
    let mut parent = run_id;
    while let Some(child) = step(&client.get(&parent).await.or_logs(&grid)?, "again").child_run.clone() {
        let Ok(view) = client.get(&child).await else { break };
        assert_eq!(view.status, RunStatus::Failed, "{view:?}");
        depth += 1;
        parent = child;
    }
    assert_eq!(depth, 8, "the runs below the top one");
    Ok(())
}

/// Parents that fill `--active-runs-max` still start their children: a child start may go
/// past the bound into the headroom kept for its depth, so the parents end. (Child starts
/// were refused at the bound like any start, and retried for ever: the parents waited for
/// children that could never start.) The parents start delayed, so that both hold their
/// place before either asks for its child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_that_fill_the_active_runs_bound_still_start_their_children() -> anyhow::Result<()> {
    const PARENTS: usize = 2;
    let mut grid = Grid::start_nats()?;
    grid.spawn_coordinator_with_args(&["--active-runs-max", &PARENTS.to_string()])?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 4)?;
    let client = grid.client().await?;
    deploy(&grid, &client, DOUBLER).await?;
    deploy(&grid, &client, PARENT).await?;
    let at = flowgrid_sdk::parse_start_time("1s").expect("a duration");
    let mut parents = Vec::new();
    for n in 0..PARENTS {
        let delayed = StartRun { start_at_ms: Some(at), ..start("parent", json!({"n": n})) };
        parents.push(client.start(delayed).await.or_logs(&grid)?.run_id);
    }
    for (n, parent) in parents.iter().enumerate() {
        let view = grid.wait_run(&client, parent, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
        assert_eq!(view.output, Some(json!({"after": 2 * n + 1})), "{view:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_child() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAITER).await?;
    deploy(&grid, &client, WAITING_PARENT).await?;
    let run_id = client.start(start("waiting-parent", json!({}))).await.or_logs(&grid)?.run_id;
    let child_id = wait_child_waiting(&grid, &client, &run_id).await?;

    client.cancel(&run_id, "not needed").await.or_logs(&grid)?;
    let child = grid.wait_run(&client, &child_id, RUN_DEADLINE).await?;
    assert_eq!(child.status, RunStatus::Cancelled, "{child:?}\n{}", grid.logs());
    assert!(child.error.as_ref().unwrap().message.contains("cancelled"), "{child:?}");
    let parent = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!((parent.status, step(&parent, "invoke").status), (RunStatus::Cancelled, StepStatus::Cancelled));
    Ok(())
}

/// A child's end sent through the API that the grid would never send is refused before
/// its parent's shard sees it, and the step still waits for its child: an end larger than
/// the grid's payload limit and room for its fields, or an error with a blank code (which
/// no catch or retry policy could match). Both were applied: the step ended with them.
/// An output nested deeper than a worker's may be is taken: a child's output nests a level
/// below its steps' outputs, so the grid sends such ends itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_end_the_grid_would_not_send_is_refused_and_the_step_still_waits() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAITER).await?;
    deploy(&grid, &client, WAITING_PARENT).await?;
    let run_id = client.start(start("waiting-parent", json!({}))).await.or_logs(&grid)?.run_id;
    let child = wait_child_waiting(&grid, &client, &run_id).await?;

    let forged = |status, output, error| ChildRunEnded {
        parent: run_id.clone(),
        step: "invoke".into(),
        item: None,
        child: child.clone(),
        status,
        output,
        error,
        refused: false,
    };
    let payload_max = flowgrid_model::Limits::default().payload_bytes_max;
    let blank = TaskError { code: " ".into(), message: "forged".into(), retryable: false };
    let ends = [
        (forged(RunStatus::Succeeded, Some(json!("x".repeat(payload_max + 4_096))), None), ErrorCode::PayloadTooLarge),
        (forged(RunStatus::Failed, None, Some(blank)), ErrorCode::InvalidRequest),
    ];
    for (end, code) in ends {
        let error = client.child_ended(&end).await.expect_err("refused");
        assert_eq!((refusal(&error).code, refusal(&error).retryable), (code, false), "{error:?}");
    }
    let parent = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!((parent.status, step(&parent, "invoke").status), (RunStatus::Running, StepStatus::Running));
    assert!(client.signal(&child, "approve", json!({"by": "ops"})).await.or_logs(&grid)?.applied);
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.output, Some(json!({"by": "ops"})), "the child's own end: {view:?}\n{}", grid.logs());

    // An input as deep as a start's may be, passed on by the child's one step: the child's
    // output (`{step id: output}`) is a level deeper.
    deploy(&grid, &client, "name: wrap\nsteps:\n  - { id: same, kind: transform, output: 'input' }\n").await?;
    deploy(&grid, &client, "name: wrapper\nsteps:\n  - { id: invoke, kind: subflow, flow: wrap, input: 'input' }\n")
        .await?;
    let depth_max = flowgrid_model::Limits::default().nesting_depth_max;
    let deep = (0..depth_max).fold(json!(1), |inner, _| json!([inner]));
    let run_id = client.start(start("wrapper", deep.clone())).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "invoke").output, Some(json!({ "same": deep })), "{view:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subflow_step_that_times_out_cancels_its_child_and_its_catch_takes_over() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAITER).await?;
    let impatient = "name: impatient\nsteps:\n  - { id: invoke, kind: subflow, flow: waiter, timeout_ms: 300, \
                     catch: [{ errors: [timeout], next: gave_up }] }\n  - { id: gave_up, kind: transform, output: '1' }\n";
    deploy(&grid, &client, impatient).await?;
    let run_id = client.start(start("impatient", json!({}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let invoke = step(&view, "invoke");
    assert_eq!((invoke.status, invoke.caught), (StepStatus::Failed, true), "{invoke:?}");
    assert_eq!(invoke.error.as_ref().map(|error| error.code.as_str()), Some("timeout"));
    assert!(invoke.ended_ms.unwrap() - invoke.started_ms.unwrap() >= 300, "{invoke:?}");
    let child = grid.wait_run(&client, invoke.child_run.as_ref().expect("its child"), RUN_DEADLINE).await?;
    assert_eq!(child.status, RunStatus::Cancelled, "{child:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_starts_and_ends_reach_their_runs_across_coordinator_crashes() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAITER).await?;
    deploy(&grid, &client, WAITING_PARENT).await?;

    // A child's start: the parents' coordinator commits the parents, cannot reach the
    // children's shards (their owner is dead), and dies too. The next coordinator starts
    // the children from the parents' state.
    grid.spawn_coordinator()?;
    let owners = grid.wait_shards_served_by(2, Duration::from_secs(30)).await?;
    let split = split_keys(&grid, &owners, [0, 1], "start");
    grid.coordinators[1].kill_hard();
    let mut parents = Vec::new();
    for key in &split {
        let start = StartRun { idempotency_key: Some(key.clone()), ..start("waiting-parent", json!({})) };
        parents.push(client.start(start).await.or_logs(&grid)?.run_id);
    }
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    for (index, parent) in parents.iter().enumerate() {
        let child = wait_child_waiting(&grid, &client, parent).await?;
        assert!(client.signal(&child, "approve", json!({"n": index})).await.or_logs(&grid)?.applied);
    }
    for (index, parent) in parents.iter().enumerate() {
        let view = grid.wait_run(&client, parent, RUN_DEADLINE).await?;
        assert_eq!(view.output, Some(json!({"n": index})), "{view:?}\n{}", grid.logs());
    }

    // A child's end: the children's coordinator commits their ends while the parents'
    // owner is dead, and dies too. The next coordinator sends the ends from its outbox.
    let first = grid.coordinators.len() - 1;
    grid.spawn_coordinator()?;
    let owners = grid.wait_shards_served_by(2, Duration::from_secs(30)).await?;
    let split = split_keys(&grid, &owners, [first, first + 1], "end");
    let mut parents = Vec::new();
    let mut children = Vec::new();
    for key in &split {
        let start = StartRun { idempotency_key: Some(key.clone()), ..start("waiting-parent", json!({})) };
        let parent = client.start(start).await.or_logs(&grid)?.run_id;
        children.push(wait_child_waiting(&grid, &client, &parent).await?);
        parents.push(parent);
    }
    grid.coordinators[first].kill_hard();
    for (index, child) in children.iter().enumerate() {
        assert!(client.signal(child, "approve", json!({"n": index})).await.or_logs(&grid)?.applied);
    }
    grid.coordinators[first + 1].kill_hard();
    grid.start_coordinator().await?;
    for (index, parent) in parents.iter().enumerate() {
        let view = grid.wait_run(&client, parent, RUN_DEADLINE).await?;
        assert_eq!(view.output, Some(json!({"n": index})), "{view:?}\n{}", grid.logs());
    }
    Ok(())
}

/// Three idempotency keys whose `waiting-parent` run lands on a shard of coordinator
/// `on[0]` and whose child lands on a shard of coordinator `on[1]` (`owners`: each shard's
/// owner, as served now).
fn split_keys(grid: &Grid, owners: &[String], on: [usize; 2], tag: &str) -> Vec<String> {
    let owned_by = |run_id: &RunId, coordinator: usize| {
        let owner = &owners[shard_of(run_id.as_str(), grid.shards).0 as usize];
        owner.contains(&format!("-{}-", grid.coordinators[coordinator].pid()))
    };
    let keys = (0..10_000).map(|n| format!("{tag}-{n}")).filter(|key| {
        let parent = RunId::from_idempotency_key("waiting-parent", key);
        let child = ParentRef::child_run_id("waiter", &parent, "invoke", None, 0);
        owned_by(&parent, on[0]) && owned_by(&child, on[1])
    });
    let keys: Vec<String> = keys.take(3).collect();
    assert_eq!(keys.len(), 3, "keys that split parent and child between {on:?}: {owners:?}");
    keys
}

/// The child of `parent`'s step `invoke`, once it waits for its signal.
async fn wait_child_waiting(grid: &Grid, client: &flowgrid_sdk::Client, parent: &RunId) -> anyhow::Result<RunId> {
    wait_iteration_waiting(grid, client, parent, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_runs_its_child_until_its_condition_holds_and_gives_up_after_its_last_iteration() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, DOUBLER).await?;
    let grow = r#"
name: grow
steps:
  - id: invoke
    kind: subflow
    flow: doubler
    input: '#{ n: if iteration == 0 { input.n } else { previous.value } }'
    repeat: { until: 'result.value >= input.limit', max_iterations: 8 }
    catch: [{ errors: [iterations_exhausted], next: gave_up }]
  - { id: gave_up, kind: transform, output: 'steps.invoke.error.message' }
"#;
    deploy(&grid, &client, grow).await?;

    let run_id = client.start(start("grow", json!({"n": 3, "limit": 100}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let invoke = step(&view, "invoke");
    assert_eq!((invoke.output.clone(), invoke.attempts), (Some(json!({"value": 192})), 6), "3 doubled 6 times");
    let children = client.list(ListRuns { parent: Some(run_id.clone()), ..Default::default() }).await?;
    assert_eq!(children.runs.len(), 6, "one child run per iteration: {children:?}");
    assert!(children.runs.iter().all(|child| child.status == RunStatus::Succeeded), "{children:?}");
    let last = ParentRef::child_run_id("doubler", &run_id, "invoke", None, 5);
    assert_eq!(invoke.child_run, Some(last), "the step names its last iteration's child");

    let run_id = client.start(start("grow", json!({"n": 1, "limit": 1000}))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let invoke = step(&view, "invoke");
    assert_eq!((invoke.status, invoke.caught, invoke.attempts), (StepStatus::Failed, true, 8), "{invoke:?}");
    let message = step(&view, "gave_up").output.clone().expect("the catch's output");
    assert!(message.as_str().unwrap().contains("ran 8 iterations"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_goes_on_from_its_iteration_after_a_coordinator_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAITER).await?;
    let approvals = "name: approvals\noutput: 'steps.invoke.output'\nsteps:\n  - { id: invoke, kind: subflow, \
                     flow: waiter, repeat: { until: 'result.done' } }\n";
    deploy(&grid, &client, approvals).await?;
    let run_id = client.start(start("approvals", json!({}))).await.or_logs(&grid)?.run_id;

    let first = wait_iteration_waiting(&grid, &client, &run_id, Some(0)).await?;
    let (ok, stdout, _) = grid.cli(&["run", "get", run_id.as_str()])?;
    assert!(ok && stdout.contains(&format!("step invoke runs child run {first} (loop iteration 0)")), "{stdout}");
    assert!(client.signal(&first, "approve", json!({"done": false})).await.or_logs(&grid)?.applied);
    let second = wait_iteration_waiting(&grid, &client, &run_id, Some(1)).await?;
    assert_ne!(first, second, "each iteration is a run of its own");

    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let after_crash = wait_iteration_waiting(&grid, &client, &run_id, Some(1)).await?;
    assert_eq!(after_crash, second, "the loop is still at its second iteration, with the same child");
    assert!(client.signal(&second, "approve", json!({"done": true, "by": "ops"})).await.or_logs(&grid)?.applied);
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.output, Some(json!({"done": true, "by": "ops"})), "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "invoke").attempts, 2, "{view:?}");
    Ok(())
}

/// The child of `parent`'s step `invoke` (of loop iteration `iteration`, if given), once
/// it waits for its signal.
async fn wait_iteration_waiting(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    parent: &RunId,
    iteration: Option<u32>,
) -> anyhow::Result<RunId> {
    wait_for("the child run to wait for its signal", RUN_DEADLINE, || async {
        let view = client.get(parent).await.ok()?;
        let invoke = step(&view, "invoke");
        if iteration.is_some_and(|iteration| invoke.iteration != Some(iteration)) {
            return None;
        }
        let child = invoke.child_run.clone()?;
        let child_view = client.get(&child).await.ok()?;
        (step(&child_view, "approve").status == StepStatus::Running).then_some(child)
    })
    .await
    .or_logs(grid)
}

/// A child whose end is over the NATS server's `max_payload` (its output within the grid's
/// payload limit) fails its parent's step with `payload_too_large`: the SDK refused to send
/// the end, and it was tried again every 10 s for good while the parent waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_end_over_the_servers_max_payload_fails_the_step() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("max_payload: 512KB")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    let twice = "name: twice\noutput: 'steps.both.output'\nsteps:\n  - { id: both, kind: transform, output: '[input, \
                 input]' }\n";
    deploy(&grid, &client, twice).await?;
    deploy(&grid, &client, "name: caller\nsteps:\n  - { id: invoke, kind: subflow, flow: twice, input: 'input' }\n")
        .await?;
    // 270 KB in, 540 KB out: within the grid's payload limit, over the server's bound.
    let run_id = client.start(start("caller", json!({ "blob": "x".repeat(270_000) }))).await.or_logs(&grid)?.run_id;
    let view = wait_for("the parent to end", Duration::from_secs(30), || async {
        client.get(&run_id).await.ok().filter(|view| view.status.is_terminal())
    })
    .await
    .or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Failed, "{}", grid.logs());
    let error = step(&view, "invoke").error.as_ref().expect("the step failed");
    assert_eq!(error.code, "payload_too_large", "{error:?}");
    assert!(error.message.contains("max_payload") && error.message.contains("succeeded"), "{error:?}");
    Ok(())
}
