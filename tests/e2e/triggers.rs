//! Triggers: every message of a stream starts exactly one run of the flow, with the message
//! as its input, across a coordinator crash and a pause amid a backlog; a message that is
//! not JSON starts nothing, nor does one older than the retention of ended runs when the
//! trigger's consumer is made again; a trigger that could never start a run (its stream
//! does not exist, is no stream's name, keeps messages only for the consumers there, or has
//! no subject its own could match) is refused at deploy; a consumer made by hand without
//! explicit acks is not read; a version without a trigger stops it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, RetentionPolicy};
use flowgrid_sdk::{ErrorCode, ListRuns, RunId, RunStatus};
use flowgrid_tests::{free_port, metric_value, scrape_metrics, wait_for, Grid};
use serde_json::Value;

use crate::{deploy, refusal, wait_for_log, OrLogs, RUN_DEADLINE};

const TRIGGERED: &str = r#"
name: on-order
trigger: { stream: ORDERS, subject: 'orders.*.created' }
output: 'steps.echo.output'
steps:
  - { id: echo, kind: task, pool: a, task: echo }
"#;

/// The ids and inputs of the runs of `on-order`, once there are `count` and all succeeded.
async fn runs_once(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    count: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<(RunId, Value)>> {
    let runs = wait_for(&format!("{count} runs of on-order"), deadline, || async {
        let query = ListRuns { flow: Some("on-order".into()), limit: Some(100), ..Default::default() };
        let runs = client.list(query).await.ok()?.runs;
        (runs.len() >= count && runs.iter().all(|run| run.status == RunStatus::Succeeded)).then_some(runs)
    })
    .await
    .or_logs(grid)?;
    let mut inputs = Vec::new();
    for run in runs {
        let input = client.get(&run.run_id).await?.input;
        inputs.push((run.run_id, input));
    }
    Ok(inputs)
}

/// Publishes `payload` on `subject`; the run it starts has the id that follows from its
/// stream sequence, whatever delivers it how often.
async fn publish(jetstream: &async_nats::jetstream::Context, subject: &str, payload: String) -> anyhow::Result<RunId> {
    let ack = jetstream.publish(subject.to_owned(), payload.into()).await?.await?;
    Ok(RunId::from_idempotency_key("on-order", &format!("trigger/ORDERS/{}", ack.sequence)))
}

/// Waits until the trigger of `on-order` has made its consumer on `ORDERS`.
async fn wait_trigger_consumer(grid: &Grid, jetstream: &async_nats::jetstream::Context) -> anyhow::Result<()> {
    let consumer = format!("{}_trigger_on-order", grid.prefix);
    wait_for("the trigger's consumer", RUN_DEADLINE, || async {
        jetstream.get_stream("ORDERS").await.ok()?.consumer_info(&consumer).await.ok().map(|_| ())
    })
    .await
    .or_logs(grid)
}

fn ids_and_orders(runs: &[(RunId, Value)]) -> BTreeSet<(RunId, Option<i64>)> {
    runs.iter().map(|(run_id, input)| (run_id.clone(), input["order"].as_i64())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_the_stream_starts_exactly_one_run() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let nats = grid.nats_client().await?;
    let jetstream = async_nats::jetstream::new(nats.clone());

    let error = client.deploy(TRIGGERED).await.expect_err("no stream yet");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidDefinition, "{error:?}");
    assert!(refusal(&error).message.contains("no JetStream stream \"ORDERS\""), "{error:?}");

    jetstream
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
    // Published before the trigger exists: not a run.
    publish(&jetstream, "orders.eu.created", r#"{"order": 0}"#.to_owned()).await?;
    deploy(&grid, &client, TRIGGERED).await?;
    wait_trigger_consumer(&grid, &jetstream).await?;

    let mut expected = BTreeSet::new();
    for order in 1..=3 {
        expected
            .insert((publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?, Some(order)));
    }
    publish(&jetstream, "orders.eu.cancelled", r#"{"order": 9}"#.to_owned()).await?;
    publish(&jetstream, "orders.us.created", "not json".to_owned()).await?;
    let runs = runs_once(&grid, &client, 3, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), expected, "one run per message of the subject, keyed by its sequence");
    let (ok, stdout, stderr) = grid.cli(&["flow", "list"])?;
    assert!(ok && stdout.contains("stream ORDERS (orders.*.created)"), "{stdout}\n{stderr}");
    let (ok, stdout, stderr) = grid.cli(&["status"])?;
    let line = stdout.lines().find(|line| line.starts_with("on-order")).unwrap_or_default();
    assert!(ok && line.contains("ORDERS") && line.contains("orders.*.created"), "{stdout}\n{stderr}");

    // A message published as its coordinator dies, and messages published while none
    // runs, start one run each, once (one out when the coordinator died comes back after
    // the consumer's ack wait).
    expected.insert((publish(&jetstream, "orders.us.created", r#"{"order": 4}"#.to_owned()).await?, Some(4)));
    grid.coordinators[0].kill_hard();
    for order in 5..=6 {
        expected
            .insert((publish(&jetstream, "orders.us.created", format!(r#"{{"order": {order}}}"#)).await?, Some(order)));
    }
    grid.start_coordinator().await?;
    runs_once(&grid, &client, 6, Duration::from_secs(60)).await?;
    // What must not happen (a seventh run) has half a second to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = runs_once(&grid, &client, 6, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), expected, "no message started a second run");

    // A version without a trigger stops it (before the deploy is answered).
    deploy(&grid, &client, &TRIGGERED.replace("trigger: { stream: ORDERS, subject: 'orders.*.created' }\n", ""))
        .await?;
    publish(&jetstream, "orders.eu.created", r#"{"order": 7}"#.to_owned()).await?;
    // What must not happen (a run for it) has a second to show.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(runs_once(&grid, &client, 6, RUN_DEADLINE).await?.len(), 6, "no run after the trigger was removed");
    Ok(())
}

/// Makes the trigger's consumer of flow `on-order` on `stream` before its deploy, delivering
/// every message the stream holds (as flows.md shows).
async fn make_consumer_first(grid: &Grid, stream: &async_nats::jetstream::stream::Stream) -> anyhow::Result<()> {
    make_consumer(grid, stream, AckPolicy::Explicit).await?;
    Ok(())
}

/// Makes the trigger's consumer of flow `on-order` on `stream` by hand, delivering every
/// message the stream holds, with `ack_policy`; gives its name.
async fn make_consumer(
    grid: &Grid,
    stream: &async_nats::jetstream::stream::Stream,
    ack_policy: AckPolicy,
) -> anyhow::Result<String> {
    let consumer = format!("{}_trigger_on-order", grid.prefix);
    let config = pull::Config {
        durable_name: Some(consumer.clone()),
        deliver_policy: DeliverPolicy::All,
        ack_policy,
        ..Default::default()
    };
    stream.create_consumer(config).await?;
    Ok(consumer)
}

/// Makes stream `ORDERS` and deploys the flow `on-order` first without its trigger, pauses
/// it, then deploys its trigger: the trigger's consumer is made only on the resume. Returns
/// a JetStream context to publish with.
async fn deploy_trigger_paused(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
) -> anyhow::Result<async_nats::jetstream::Context> {
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let orders = stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
    jetstream.create_stream(orders).await?;
    let untriggered = TRIGGERED.replace("trigger: { stream: ORDERS, subject: 'orders.*.created' }\n", "");
    deploy(grid, client, &untriggered).await?;
    client.pause_flow("on-order", "maintenance").await.or_logs(grid)?;
    deploy(grid, client, TRIGGERED).await?;
    Ok(jetstream)
}

/// The messages published after a trigger was deployed start their runs though its
/// consumer came later: here the flow was paused when the trigger's version was deployed,
/// so its consumer was made only on the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_before_the_trigger_s_consumer_was_made_start_their_runs() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = deploy_trigger_paused(&grid, &client).await?;
    let mut expected = BTreeSet::new();
    for order in 1..=3 {
        expected
            .insert((publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?, Some(order)));
    }
    let consumer = format!("{}_trigger_on-order", grid.prefix);
    let made = jetstream.get_stream("ORDERS").await?.consumer_info(&consumer).await;
    assert!(made.is_err(), "a paused flow's trigger makes no consumer: {made:?}");
    client.resume_flow("on-order", "done").await.or_logs(&grid)?;
    let runs = runs_once(&grid, &client, 3, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), expected, "one run per message published since the deploy");
    Ok(())
}

/// A trigger's consumer deleted (to start afresh, or by mistake) is made again reading from
/// the flow's first deploy: the messages published longer ago than the retention, whose
/// runs may have been deleted, start no second run under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_again_starts_no_run_for_messages_older_than_the_retention() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    grid.spawn_coordinator_with_args(&["--retain-ended-runs", "2s", "--metrics-addr", &metrics_addr])?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let orders = stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
    jetstream.create_stream(orders).await?;
    deploy(&grid, &client, TRIGGERED).await?;
    wait_trigger_consumer(&grid, &jetstream).await?;
    for order in 1..=3 {
        publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?;
    }
    runs_once(&grid, &client, 3, RUN_DEADLINE).await?;
    let query = || ListRuns { flow: Some("on-order".into()), ..Default::default() };
    wait_for("the ended runs to be deleted", RUN_DEADLINE, || async {
        client.list(query()).await.ok().filter(|list| list.runs.is_empty())
    })
    .await
    .or_logs(&grid)?;

    let consumer = format!("{}_trigger_on-order", grid.prefix);
    jetstream.get_stream("ORDERS").await?.delete_consumer(&consumer).await?;
    wait_trigger_consumer(&grid, &jetstream).await?;
    // The consumer made again delivers the three messages again: each is either turned
    // away as too old or starts a run, whichever shows first.
    let too_old = "flowgrid_trigger_messages_total{flow=\"on-order\",outcome=\"too_old\"}";
    let (runs, turned_away) = wait_for("the messages delivered again to be settled", RUN_DEADLINE, || async {
        let turned_away = metric_value(&scrape_metrics(&metrics_addr).ok()?, too_old).unwrap_or(0.0);
        let runs = client.list(query()).await.ok()?.runs;
        (!runs.is_empty() || turned_away >= 3.0).then_some((runs, turned_away))
    })
    .await
    .or_logs(&grid)?;
    let started: Vec<_> = runs.iter().map(|run| &run.run_id).collect();
    assert_eq!(
        (started.len(), turned_away),
        (0, 3.0),
        "no message older than the retention starts a run again: {started:?}"
    );
    Ok(())
}

/// Messages waiting for a trigger: more than the starts it runs at once (64).
const BACKLOG: i64 = 200;

/// A flow paused while its trigger works through a backlog, and resumed: every message
/// starts its run exactly once, those whose start had not begun when the pause came too
/// (they go back to the stream for the resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_paused_amid_a_backlog_starts_every_run_once_resumed() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    // The trigger's version is deployed while the flow is paused, so that the backlog is
    // all there when the resume makes its consumer.
    let jetstream = deploy_trigger_paused(&grid, &client).await?;
    let mut expected = BTreeSet::new();
    for order in 1..=BACKLOG {
        expected
            .insert((publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?, Some(order)));
    }
    // Paused again as the trigger begins: most often amid the backlog, some of its starts
    // under way and some not begun.
    client.resume_flow("on-order", "backlog in").await.or_logs(&grid)?;
    client.pause_flow("on-order", "amid the backlog").await.or_logs(&grid)?;
    client.resume_flow("on-order", "done").await.or_logs(&grid)?;

    let deadline = Duration::from_secs(60);
    let runs = wait_for(&format!("{BACKLOG} runs of on-order"), deadline, || async {
        let query = ListRuns { flow: Some("on-order".into()), limit: Some(1_000), ..Default::default() };
        let runs = client.list(query).await.ok()?.runs;
        let ended = runs.iter().all(|run| run.status == RunStatus::Succeeded);
        (runs.len() >= BACKLOG as usize && ended).then_some(runs)
    })
    .await
    .or_logs(&grid)?;
    let mut inputs = Vec::new();
    for run in runs {
        let input = client.get(&run.run_id).await?.input;
        inputs.push((run.run_id, input));
    }
    assert_eq!(inputs.len(), BACKLOG as usize, "one run per message");
    assert_eq!(ids_and_orders(&inputs), expected, "each message started its own run");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_starts_a_run_for_each_of_its_messages() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let orders = || stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
    jetstream.create_stream(orders()).await?;
    deploy(&grid, &client, TRIGGERED).await?;
    wait_trigger_consumer(&grid, &jetstream).await?;
    for order in 1..=3 {
        publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?;
    }
    runs_once(&grid, &client, 3, RUN_DEADLINE).await?;

    // Deleted and made again, the stream numbers its messages from 1 again: each starts a
    // run of its own (not the run of the message the stream had under that number
    // before), published before the trigger found the new stream too.
    jetstream.delete_stream("ORDERS").await?;
    let (_, _, hints) = grid.cli(&["status"])?;
    assert!(hints.contains("flow on-order's trigger reads stream ORDERS, which does not exist"), "{hints}");
    let (_, stdout, stderr) = grid.cli(&["--json", "status"])?;
    let status: Value = serde_json::from_str(&stdout).with_context(|| format!("{stdout}\n{stderr}"))?;
    assert_eq!(
        status["unread_triggers"],
        serde_json::json!([{"flow": "on-order", "stream": "ORDERS", "stream_exists": false}]),
        "{stdout}"
    );
    jetstream.create_stream(orders()).await?;
    for order in 11..=13 {
        publish(&jetstream, "orders.eu.created", format!(r#"{{"order": {order}}}"#)).await?;
    }
    let runs = runs_once(&grid, &client, 6, Duration::from_secs(30)).await?;
    let orders: BTreeSet<Option<i64>> = runs.iter().map(|(_, input)| input["order"].as_i64()).collect();
    let expected: BTreeSet<Option<i64>> = [1, 2, 3, 11, 12, 13].into_iter().map(Some).collect();
    assert_eq!(orders, expected, "{runs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_by_hand_before_the_deploy_is_used_as_it_is() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let orders = jetstream
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
    let earlier = publish(&jetstream, "orders.eu.created", r#"{"order": 1}"#.to_owned()).await?;
    // To start runs for the messages already in the stream too: deliver them all.
    make_consumer_first(&grid, &orders).await?;
    deploy(&grid, &client, TRIGGERED).await?;
    let later = publish(&jetstream, "orders.eu.created", r#"{"order": 2}"#.to_owned()).await?;
    let runs = runs_once(&grid, &client, 2, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), BTreeSet::from([(earlier, Some(1)), (later, Some(2))]));
    Ok(())
}

/// A flow whose trigger reads `trigger` (the inside of its braces).
fn triggered_by(trigger: &str) -> String {
    format!("name: on-order\ntrigger: {{ {trigger} }}\nsteps:\n  - {{ id: s, kind: task, pool: a, task: echo }}\n")
}

/// The grid's first answer to deploying `definition` (no retries), which must be a refusal
/// of the definition at `path`, for good.
async fn refused_at(client: &flowgrid_sdk::Client, definition: &str, path: &str) -> anyhow::Result<String> {
    let error = client.clone().with_retry_budget(Duration::ZERO).deploy(definition).await.expect_err(definition);
    let refused = refusal(&error);
    assert_eq!((refused.code, refused.retryable), (ErrorCode::InvalidDefinition, false), "{definition}: {error:?}");
    assert!(refused.issues.iter().any(|issue| issue.path == path), "{definition}: {error:?}");
    Ok(refused.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_could_never_start_a_run_is_refused_at_deploy() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);

    // No stream's name: NATS cannot even look it up, and no retry would change that.
    for stream in ["'my.orders'", "''", "'my orders'"] {
        refused_at(&client, &triggered_by(&format!("stream: {stream}")), "trigger.stream").await?;
    }

    // A work-queue stream refuses a consumer that starts at the deploy's time; an interest
    // stream drops what is published while the trigger has no consumer yet.
    for (name, retention, why) in
        [("JOBS", RetentionPolicy::WorkQueue, "work-queue"), ("EVENTS", RetentionPolicy::Interest, "interest")]
    {
        let subjects = vec![format!("{}.>", name.to_lowercase())];
        jetstream
            .create_stream(stream::Config { name: name.into(), subjects, retention, ..Default::default() })
            .await?;
        let message = refused_at(&client, &triggered_by(&format!("stream: {name}")), "trigger.stream").await?;
        assert!(message.contains(why) && message.contains("limits retention"), "{message}");
    }

    // A subject that no subject of the stream could match: NATS takes such a consumer,
    // which never gets a message.
    let orders = stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
    jetstream.create_stream(orders).await?;
    for subject in ["invoices.*.created", "orders", "*"] {
        let definition = triggered_by(&format!("stream: ORDERS, subject: '{subject}'"));
        let message = refused_at(&client, &definition, "trigger.subject").await?;
        assert!(message.contains("orders.>"), "the stream's subjects are named: {message}");
    }
    // A consumer made by hand that does not acknowledge each message on its own would lose
    // messages, and NATS does not let its ack policy change.
    let orders = jetstream.get_stream("ORDERS").await?;
    let consumer = make_consumer(&grid, &orders, AckPolicy::All).await?;
    let message = refused_at(&client, &triggered_by("stream: ORDERS"), "trigger.stream").await?;
    assert!(
        message.contains("ack policy `all`") && message.contains(&format!("nats consumer rm ORDERS {consumer}")),
        "{message}"
    );
    orders.delete_consumer(&consumer).await?;
    // One that some of its messages match is taken, though wider than the stream.
    deploy(&grid, &client, &triggered_by("stream: ORDERS, subject: '*.eu.created'")).await?;
    Ok(())
}

/// Makes the work-queue stream `ORDERS` and the trigger's consumer on it by hand, as
/// flows.md asks, deploys the trigger, and sees a message start its run. Returns a
/// JetStream context to publish with, and the run.
async fn serve_work_queue_trigger(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
) -> anyhow::Result<(async_nats::jetstream::Context, RunId)> {
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let config = stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        retention: RetentionPolicy::WorkQueue,
        ..Default::default()
    };
    let orders = jetstream.create_stream(config).await?;
    make_consumer_first(grid, &orders).await?;
    deploy(grid, client, TRIGGERED).await?;
    let run = publish(&jetstream, "orders.eu.created", r#"{"order": 1}"#.to_owned()).await?;
    let runs = runs_once(grid, client, 1, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), BTreeSet::from([(run.clone(), Some(1))]));
    Ok((jetstream, run))
}

/// A work-queue stream serves a trigger whose consumer was made by hand, delivering all of
/// its messages, before the deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_stream_serves_a_trigger_whose_consumer_was_made_first() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    serve_work_queue_trigger(&grid, &client).await?;
    Ok(())
}

/// The trigger's consumer on a work-queue stream, deleted (to have it made afresh), is made
/// again by the trigger, delivering all the stream holds, as NATS asks of such a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_stream_s_trigger_consumer_deleted_is_made_again() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let (jetstream, first) = serve_work_queue_trigger(&grid, &client).await?;
    let consumer = format!("{}_trigger_on-order", grid.prefix);
    jetstream.get_stream("ORDERS").await?.delete_consumer(&consumer).await?;
    let second = publish(&jetstream, "orders.eu.created", r#"{"order": 2}"#.to_owned()).await?;
    let runs = runs_once(&grid, &client, 2, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), BTreeSet::from([(first, Some(1)), (second, Some(2))]));
    Ok(())
}

/// A consumer made by hand that does not acknowledge each message on its own (here with
/// ack policy `all`, where acknowledging one message acknowledges those before it) is not
/// read: the coordinator says what to do, and once it is deleted the trigger makes its own.
/// Made after the deploy (the flow paused meanwhile), it is one the deploy cannot check
/// (one made before is refused there: `a_trigger_that_could_never_start_a_run_is_refused_at_deploy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_by_hand_without_explicit_acks_is_not_read() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = deploy_trigger_paused(&grid, &client).await?;
    let orders = jetstream.get_stream("ORDERS").await?;
    let consumer = make_consumer(&grid, &orders, AckPolicy::All).await?;
    let run = publish(&jetstream, "orders.eu.created", r#"{"order": 1}"#.to_owned()).await?;
    client.resume_flow("on-order", "done").await.or_logs(&grid)?;
    let advice = format!("nats consumer rm ORDERS {consumer}");
    wait_for_log(&grid, 0, &["ack policy `all`", &advice], "the refusal of the consumer").await?;
    let info = orders.consumer_info(&consumer).await?;
    assert_eq!(info.delivered.stream_sequence, 0, "no message was read through it: {info:?}");
    let query = ListRuns { flow: Some("on-order".into()), ..Default::default() };
    assert!(client.list(query).await?.runs.is_empty(), "no run started");

    orders.delete_consumer(&consumer).await?;
    let runs = runs_once(&grid, &client, 1, RUN_DEADLINE).await?;
    assert_eq!(ids_and_orders(&runs), BTreeSet::from([(run, Some(1))]));
    Ok(())
}

/// Charges an invoice: fails with `card_declined` when the input says so.
const INVOICE: &str = r#"
name: invoice
publish_ended: true
steps:
  - id: route
    kind: choice
    choices: [{ when: 'input.declined == true', next: decline }]
    default: charge
  - { id: charge, kind: task, pool: a, task: echo }
  - { id: decline, kind: task, pool: a, task: fail, input: '#{ code: "card_declined", retryable: false }' }
"#;

/// Reacts to every failed invoice run: a run for each end of `invoice`, which reports
/// the failed ones and succeeds at once for the others.
fn on_invoice_failure(subjects: &flowgrid_proto::Subjects) -> String {
    format!(
        r#"
name: invoice-failures
trigger: {{ stream: {stream}, subject: '{subject}' }}
output: 'steps.report.output'
steps:
  - id: check
    kind: choice
    choices: [{{ when: 'input.status != "succeeded"', next: report }}]
    default: fine
  - {{ id: report, kind: transform, output: '#{{ failed_run: input.run_id, code: input.error.code }}' }}
  - {{ id: fine, kind: succeed }}
"#,
        stream = subjects.run_ends_stream(),
        subject = subjects.run_ended("invoice"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_on_the_run_ends_stream_starts_a_run_for_each_end_of_another_flow() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());

    // A flow that would read its own ends is refused: each run would start another.
    let looping = format!(
        "name: loop\npublish_ended: true\ntrigger: {{ stream: {} }}\nsteps:\n  - {{ id: s, kind: task, pool: a, task: echo }}\n",
        subjects.run_ends_stream()
    );
    let error = client.deploy(&looping).await.expect_err("a trigger on its own ends");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidDefinition, "{error:?}");
    assert!(refusal(&error).message.contains("without end"), "{error:?}");

    deploy(&grid, &client, INVOICE).await?;
    deploy(&grid, &client, &on_invoice_failure(&subjects)).await?;
    let mut ended = Vec::new();
    for declined in [false, true] {
        let start = flowgrid_sdk::StartRun {
            flow: "invoice".into(),
            version: None,
            input: serde_json::json!({ "declined": declined }),
            idempotency_key: None,
            ..Default::default()
        };
        let run_id = client.start(start).await.or_logs(&grid)?.run_id;
        ended.push((run_id.clone(), grid.wait_run(&client, &run_id, RUN_DEADLINE).await?.status));
    }
    assert_eq!(ended.iter().map(|(_, status)| *status).collect::<Vec<_>>(), [RunStatus::Succeeded, RunStatus::Failed]);

    let handlers = wait_for("a handler run per invoice end", RUN_DEADLINE, || async {
        let query = ListRuns {
            flow: Some("invoice-failures".into()),
            status: Some(RunStatus::Succeeded),
            ..Default::default()
        };
        let runs = client.list(query).await.ok()?.runs;
        (runs.len() == 2).then_some(runs)
    })
    .await
    .or_logs(&grid)?;
    let mut outputs = Vec::new();
    for run in handlers {
        outputs.push(client.get(&run.run_id).await?.output);
    }
    let failed = &ended[1].0;
    let report = serde_json::json!({ "failed_run": failed, "code": "card_declined" });
    assert!(outputs.contains(&Some(report)), "the failed invoice is reported: {outputs:?}");
    assert!(outputs.contains(&None), "the one that succeeded is not (its output is null): {outputs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_s_input_expression_makes_the_run_input_from_the_message_and_its_subject() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    jetstream
        .create_stream(stream::Config {
            name: "SHIPMENTS".into(),
            subjects: vec!["shipments.>".into()],
            ..Default::default()
        })
        .await?;
    let reads_steps = "name: ship\ntrigger: { stream: SHIPMENTS, input: 'steps.s.output' }\nsteps:\n  - { id: s, kind: task, pool: a, task: echo }\n";
    let error = client.deploy(reads_steps).await.expect_err("a trigger input reading steps");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidDefinition, "{error:?}");
    assert!(refusal(&error).message.contains("trigger.input"), "{error:?}");

    let flow = r#"
name: ship
trigger:
  stream: SHIPMENTS
  input: '#{ id: input.message.id, region: input.subject.split(".")[1], sequence: input.sequence }'
  labels: { source: shipments }
output: 'steps.s.output'
steps:
  - { id: s, kind: task, pool: a, task: echo }
"#;
    deploy(&grid, &client, flow).await?;
    // Once the trigger's consumer exists, a message starts a run.
    let consumer = format!("{}_trigger_ship", grid.prefix);
    wait_for("the trigger's consumer", RUN_DEADLINE, || async {
        jetstream
            .get_stream("SHIPMENTS")
            .await
            .ok()?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&consumer)
            .await
            .ok()
    })
    .await
    .or_logs(&grid)?;
    let ack = jetstream.publish("shipments.eu.ready", r#"{"id": 7, "weight": 3}"#.into()).await?.await?;
    let run_id = RunId::from_idempotency_key("ship", &format!("trigger/SHIPMENTS/{}", ack.sequence));
    let view = wait_for("the message's run", RUN_DEADLINE, || async {
        client.get(&run_id).await.ok().filter(|view| view.status.is_terminal())
    })
    .await
    .or_logs(&grid)?;
    let expected = serde_json::json!({"id": 7, "region": "eu", "sequence": ack.sequence});
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(expected)), "{}", grid.logs());
    assert_eq!(view.labels.get("source").map(String::as_str), Some("shipments"), "the trigger's labels");
    Ok(())
}
