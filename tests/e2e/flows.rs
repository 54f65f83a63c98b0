//! Control flow: a choice between two maps, a join after both branches, transforms.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, RetentionPolicy};
use flowgrid_engine::ItemCounts;
use flowgrid_sdk::{RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

const ITEMS: i64 = 100;

const CHOICE_MAP_FLOW: &str = r#"
name: choice-map-join
output: 'steps.summary.output'
steps:
  - id: route
    kind: choice
    choices:
      - when: 'input.mode == "double"'
        next: doubled
    default: echoed
  - id: doubled
    kind: map
    items: input.numbers
    pool: a
    task: double
    max_concurrency: 20
  - id: echoed
    kind: map
    items: input.numbers
    pool: b
    task: echo
    input: '#{ value: item, index: index }'
    output: 'result.map(|r| r.value * 1000 + r.index)'
  - id: join
    kind: transform
    after: [doubled, echoed]
    output: 'if steps.doubled.status == "succeeded" { #{ branch: "double", values: steps.doubled.output } } else { #{ branch: "echo", values: steps.echoed.output } }'
  - id: summary
    kind: transform
    after: [join]
    output: '#{ branch: steps.join.output.branch, values: steps.join.output.values, count: steps.join.output.values.len(), sum: steps.join.output.values.reduce(|sum, x| sum + x, 0) }'
"#;

fn expected_summary(branch: &str, values: Vec<i64>) -> Value {
    let sum: i64 = values.iter().sum();
    json!({"branch": branch, "count": values.len(), "sum": sum, "values": values})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choice_then_map_over_100_items_then_join_gives_the_computed_output() -> anyhow::Result<()> {
    let grid = Grid::start(&["a", "b"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, CHOICE_MAP_FLOW).await?;

    let numbers: Vec<i64> = (0..ITEMS).map(|i| i * 7 - 150).collect();
    let mut started = Vec::new();
    for mode in ["double", "echo"] {
        let start = StartRun {
            flow: "choice-map-join".into(),
            version: None,
            input: json!({"mode": mode, "numbers": numbers}),
            idempotency_key: None,
            ..Default::default()
        };
        started.push((mode, client.start(start).await.or_logs(&grid)?));
    }

    for (mode, run) in started {
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "mode {mode}: {view:?}\n{}", grid.logs());
        let (taken, skipped, expected) = if mode == "double" {
            ("doubled", "echoed", expected_summary("double", numbers.iter().map(|n| n * 2).collect()))
        } else {
            let values = numbers.iter().zip(0..).map(|(n, index)| n * 1000 + index).collect();
            ("echoed", "doubled", expected_summary("echo", values))
        };
        assert_eq!(view.output.as_ref(), Some(&expected), "mode {mode}: wrong output\n{}", grid.logs());

        let map = step(&view, taken);
        assert_eq!(map.status, StepStatus::Succeeded, "mode {mode}: {map:?}");
        let all_done = ItemCounts { total: ITEMS as u32, succeeded: ITEMS as u32, failed: 0, running: 0 };
        assert_eq!(map.items, Some(all_done), "mode {mode}: {map:?}");
        assert_eq!(map.attempts, ITEMS as u32, "mode {mode}: one attempt per item: {map:?}");
        assert_eq!(step(&view, skipped).status, StepStatus::Skipped, "mode {mode}: branch not taken must be skipped");
        assert_eq!(step(&view, skipped).attempts, 0, "mode {mode}: a skipped map dispatches nothing");
        assert_eq!(step(&view, "route").status, StepStatus::Succeeded);
        assert_eq!(step(&view, "join").status, StepStatus::Succeeded, "the join after both branches runs");
    }
    Ok(())
}

/// What an example flow's header comment documents: `# Input: {...}` (continued on the
/// comment lines after it), then maybe `Output: {...}` (the run's) or ``Output of `step`: {...}``.
struct Documented {
    input: Value,
    /// The step whose output is documented (`None`: the run's), and that output.
    output: Option<(Option<String>, Value)>,
}

fn documented_example(path: &std::path::Path, text: &str) -> Documented {
    let json = |what: &str, text: &str| -> Value {
        serde_json::from_str(text).unwrap_or_else(|error| panic!("{}: {what}: {error}", path.display()))
    };
    let mut lines = text.lines().skip_while(|line| !line.starts_with("# Input: "));
    let first = lines.next().unwrap_or_else(|| panic!("{} documents no `# Input:`", path.display()));
    let first = first.trim_start_matches("# Input: ");
    let (mut input, output) = match first.split_once("   Output") {
        None => (first.to_owned(), None),
        Some((input, rest)) => {
            let output = match rest.strip_prefix(": ") {
                Some(run_output) => (None, json("Output", run_output)),
                None => {
                    let (step, step_output) = rest
                        .strip_prefix(" of `")
                        .and_then(|rest| rest.split_once("`: "))
                        .unwrap_or_else(|| panic!("{}: `Output: ` or ``Output of `step`: ``", path.display()));
                    (Some(step.to_owned()), json("Output", step_output))
                }
            };
            (input.to_owned(), Some(output))
        }
    };
    for line in lines.take_while(|line| line.starts_with("#  ")) {
        input.push_str(line.trim_start_matches('#'));
    }
    Documented { input: json("Input", &input), output }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_flow_runs_with_the_input_it_documents() -> anyhow::Result<()> {
    let grid = Grid::start(&["tests", "gpu-llm", "cpu-media"]).await?;
    let client = grid.client().await?;
    let dir = flowgrid_tests::repo_root().join("deploy/flows");
    let mut paths: Vec<_> =
        std::fs::read_dir(&dir)?.map(|entry| entry.map(|entry| entry.path())).collect::<Result<_, _>>()?;
    paths.sort();
    assert!(paths.len() >= 5, "examples in {}: {paths:?}", dir.display());
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let deployed = deploy(&grid, &client, &text).await?;
        let documented = documented_example(&path, &text);
        let start = StartRun {
            flow: deployed.name.clone(),
            version: None,
            input: documented.input,
            idempotency_key: None,
            ..Default::default()
        };
        let run_id = client.start(start).await.or_logs(&grid)?.run_id;
        let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{}: {view:?}\n{}", path.display(), grid.logs());
        match documented.output {
            Some((None, output)) => assert_eq!(view.output, Some(output), "{}: the run's output", path.display()),
            Some((Some(id), output)) => {
                assert_eq!(step(&view, &id).output, Some(output), "{}: the output of `{id}`", path.display())
            }
            None => {}
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_that_publishes_its_ends_announces_each_run_once_it_ended() -> anyhow::Result<()> {
    use futures::StreamExt;

    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let announced = "name: announced\npublish_ended: true\nsteps:\n  - { id: echo, kind: task, pool: a, task: echo }\n";
    let quiet = "name: quiet\nsteps:\n  - { id: echo, kind: task, pool: a, task: echo }\n";
    deploy(&grid, &client, announced).await?;
    deploy(&grid, &client, quiet).await?;
    let nats = grid.nats_client().await?;
    let mut ends = nats.subscribe(flowgrid_proto::Subjects::new(grid.prefix.clone()).run_ended_all()).await?;
    nats.flush().await?;

    let start = |flow: &str| StartRun {
        flow: flow.into(),
        version: None,
        input: json!({"n": 7}),
        idempotency_key: None,
        ..Default::default()
    };
    let quiet_run = client.start(start("quiet")).await.or_logs(&grid)?.run_id;
    grid.wait_run(&client, &quiet_run, RUN_DEADLINE).await?;
    let run_id = client.start(start("announced")).await.or_logs(&grid)?.run_id;
    let message = tokio::time::timeout(RUN_DEADLINE, ends.next()).await?.expect("an announcement");
    assert_eq!(message.subject.as_str(), format!("{}.runs.ended.announced", grid.prefix), "only the flow that asks");
    let ended: flowgrid_proto::RunEnded = serde_json::from_slice(&message.payload)?;
    assert_eq!(
        (ended.run_id, ended.status, ended.output),
        (run_id.clone(), RunStatus::Succeeded, Some(json!({"echo": {"n": 7}})))
    );
    assert!(ended.ended_ms >= ended.created_ms);
    // Announced after the commit: the run reads as ended already.
    assert_eq!(client.get(&run_id).await?.status, RunStatus::Succeeded);
    assert!(tokio::time::timeout(Duration::from_millis(500), ends.next()).await.is_err(), "one announcement per run");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_the_stream_did_not_take_is_published_once_the_coordinator_made_the_stream_again(
) -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let announced = "name: announced\npublish_ended: true\nsteps:\n  - { id: echo, kind: task, pool: a, task: echo }\n";
    deploy(&grid, &client, announced).await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    // Without the run-ends stream the announcement is not acknowledged: it stays in the
    // outbox. (With a plain subscriber on the subject, as flows.md suggests, the publish
    // gets no "no responders" but times out.)
    let _listener = grid.nats_client().await?.subscribe(format!("{}.runs.ended.>", grid.prefix)).await?;
    jetstream.delete_stream(subjects.run_ends_stream()).await?;
    let start = StartRun {
        flow: "announced".into(),
        version: None,
        input: json!({"n": 1}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;
    // Read as ended only once the end (and its announcement in the outbox) is committed.
    assert_eq!(grid.wait_run(&client, &run_id, RUN_DEADLINE).await?.status, RunStatus::Succeeded);
    // The coordinator makes the stream again and publishes what the outbox held.
    let subject = subjects.run_ended("announced");
    let ended: flowgrid_proto::RunEnded = wait_for("the announcement in the run-ends stream", RUN_DEADLINE, || async {
        let stream = jetstream.get_stream(subjects.run_ends_stream()).await.ok()?;
        let message = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
        serde_json::from_slice(&message.payload).ok()
    })
    .await
    .or_logs(&grid)?;
    let mut stream = jetstream.get_stream(subjects.run_ends_stream()).await?;
    assert_eq!((ended.run_id, ended.status), (run_id, RunStatus::Succeeded));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stream.info().await?.state.messages, 1, "one announcement per run");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_shows_what_a_deploy_would_change_and_how_two_versions_differ() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let first = "name: diffed\nsteps:\n  - { id: a, kind: transform, output: '1' }\n";
    let second = "name: diffed\nsteps:\n  - { id: a, kind: transform, output: '2' }\n";
    deploy(&grid, &client, first).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("diffed.yaml");
    std::fs::write(&file, second)?;
    let file = file.to_str().expect("a UTF-8 path");

    let (same, stdout, stderr) = grid.cli(&["flow", "diff", "diffed", file])?;
    assert!(!same, "a difference exits 1: {stdout}{stderr}");
    assert!(stdout.contains("--- diffed@1 (deployed)") && stdout.contains("-  output: '1'"), "{stdout}");
    assert!(stdout.contains("+  output: '2'"), "{stdout}");

    deploy(&grid, &client, second).await?;
    let (same, stdout, _) = grid.cli(&["flow", "diff", "diffed", file])?;
    assert!(same && stdout.contains("is the same as diffed@2 (deployed)"), "{stdout}");
    let (same, stdout, _) = grid.cli(&["flow", "diff", "diffed", "--version", "1", "--to", "2"])?;
    assert!(!same && stdout.contains("+++ diffed@2 (deployed)"), "{stdout}");

    std::fs::write(dir.path().join("other.yaml"), first.replace("diffed", "other"))?;
    let other = dir.path().join("other.yaml");
    let (ok, _, stderr) = grid.cli(&["flow", "diff", "diffed", other.to_str().unwrap()])?;
    assert!(!ok && stderr.contains("defines flow `other`, not `diffed`"), "{stderr}");
    let status = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "flow", "diff", "nowhere", file])
        .output()?
        .status;
    assert_eq!(status.code(), Some(2), "a comparison that cannot be made is not a difference");
    let unreachable = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", "nats://127.0.0.1:1", "flow", "diff", "diffed", file])
        .output()?;
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(2), "nor is a grid out of reach: {stderr}");

    // A map step without max_concurrency is stored with the default written in: the file
    // a deploy answers unchanged is the same (before, it always differed, exit 1).
    let mapped = "name: mapped\nsteps:\n  - { id: m, kind: map, items: 'input.xs', pool: a, task: echo }\n";
    deploy(&grid, &client, mapped).await?;
    let mapped_file = dir.path().join("mapped.yaml");
    std::fs::write(&mapped_file, mapped)?;
    let (same, stdout, stderr) = grid.cli(&["flow", "diff", "mapped", mapped_file.to_str().unwrap()])?;
    assert!(same && stdout.contains("is the same as mapped@1 (deployed)"), "{stdout}{stderr}");
    // A file the grid would refuse gets the refusal, not a difference (before, exit 1).
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "name: diffed\nsteps:\n  - { id: a, kind: transform, after: [zz], output: '1' }\n")?;
    let refused = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "flow", "diff", "diffed"])
        .arg(&broken)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("steps[0](a).after") && stderr.contains("zz"), "{stderr}");

    // Several files deploy together, in order; one with a problem keeps every one from deploying.
    let third = dir.path().join("third.yaml");
    std::fs::write(&third, first.replace("diffed", "third"))?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nsteps:\n  - { id: a, kind: transform, outptu: '1' }\n")?;
    let together = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "flow", "deploy"])
        .args([&third, &bad])
        .output()?;
    let (stdout, stderr) = (String::from_utf8_lossy(&together.stdout), String::from_utf8_lossy(&together.stderr));
    assert!(stderr.contains("nothing deployed"), "{stdout}{stderr}");
    assert_eq!(together.status.code(), Some(2), "an invalid definition, as when deployed alone: {stderr}");
    assert!(stdout.contains("steps[0](a).outptu: unknown field"), "{stdout}");
    // `flow test` passes no definition a deploy refuses.
    let too_long = dir.path().join("too-long.yaml");
    let definition = "name: too-long\nsteps:\n  - { id: a, kind: task, pool: p, task: t, timeout_ms: 40000000000 }\n";
    std::fs::write(&too_long, definition)?;
    let case = dir.path().join("too-long.case.yaml");
    std::fs::write(&case, "tasks: { a: { output: 1 } }\n")?;
    let (ok, stdout, stderr) = grid.cli(&["flow", "test", too_long.to_str().unwrap(), case.to_str().unwrap()])?;
    assert!(!ok && stderr.contains("timeout_ms") && !stdout.contains("passed"), "{stdout}{stderr}");
    let (ok, _, stderr) = grid.cli(&["flow", "get", "third"])?;
    assert!(!ok && stderr.contains("no flow named"), "{stderr}");
    // So is one whose trigger reads a stream that does not exist, which only NATS can tell.
    let unread = dir.path().join("unread.yaml");
    let trigger = "trigger: { stream: NO_SUCH_STREAM }\n";
    std::fs::write(&unread, first.replace("diffed", "unread").replace("steps:", &format!("{trigger}steps:")))?;
    let (ok, stdout, stderr) = grid.cli(&["flow", "deploy", third.to_str().unwrap(), unread.to_str().unwrap()])?;
    assert!(!ok && stderr.contains("nothing deployed") && stdout.contains("NO_SUCH_STREAM"), "{stdout}{stderr}");
    let (ok, _, _) = grid.cli(&["flow", "get", "third"])?;
    assert!(!ok, "third was deployed");
    // Under --json, two files of one flow, or `-` among several, are bad usage: exit 2 and
    // one JSON answer (before, nothing on stdout; for `-`, exit 1).
    let twin = dir.path().join("twin.yaml");
    std::fs::write(&twin, first.replace("diffed", "third"))?;
    for files in [[third.as_path(), twin.as_path()], [third.as_path(), Path::new("-")]] {
        let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
            .args(["--json", "--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "flow", "deploy"])
            .args(files)
            .output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(2), "{files:?}: {stdout}{stderr}");
        let answer: Value = serde_json::from_str(&stdout).map_err(|error| anyhow::anyhow!("{error}: {stdout}"))?;
        assert_eq!(answer["error"]["code"], json!("invalid_request"), "{files:?}: {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|message| !message.is_empty()), "{answer}");
    }
    let (ok, _, _) = grid.cli(&["flow", "get", "third"])?;
    assert!(!ok, "third was deployed");
    let (ok, stdout, stderr) = grid.cli(&["flow", "deploy", third.to_str().unwrap(), other.to_str().unwrap(), file])?;
    assert!(ok, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "deployed third version 1",
            "deployed other version 1",
            "diffed version 2 is unchanged (identical to the latest version)"
        ]
    );
    Ok(())
}

/// `flowgrid flow deploy` of `files` on `grid`: its exit code, stdout and stderr.
fn deploy_files(grid: &Grid, files: &[&Path]) -> anyhow::Result<(Option<i32>, String, String)> {
    let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "flow", "deploy"])
        .args(files)
        .output()?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Ok((output.status.code(), text(&output.stdout), text(&output.stderr)))
}

/// Several files deploy only if the grid would take each of them: a trigger it would refuse
/// for its stream (work-queue retention without the trigger's consumer, a subject the
/// stream never takes) or for reading its own flow's ends keeps the files before it from
/// deploying too, as a definition with a problem does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_files_deploy_none_when_the_grid_would_refuse_the_trigger_of_one() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let jobs = jetstream
        .create_stream(stream::Config {
            name: "JOBS".into(),
            subjects: vec!["jobs.>".into()],
            retention: RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let orders = stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
    jetstream.create_stream(orders).await?;
    let dir = tempfile::tempdir()?;
    let write = |name: &str, head: &str| -> anyhow::Result<PathBuf> {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!("name: {name}\n{head}\nsteps:\n  - {{ id: a, kind: transform, output: '1' }}\n"),
        )?;
        Ok(file)
    };
    let ok = write("ok", "trigger: { stream: ORDERS, subject: 'orders.*.created' }")?;
    let run_ends = flowgrid_proto::Subjects::new(grid.prefix.clone()).run_ends_stream();
    let refused = [
        ("trigger: { stream: JOBS }".to_owned(), "trigger.stream: stream \"JOBS\" has work-queue retention"),
        (
            "trigger: { stream: ORDERS, subject: 'invoices.>' }".to_owned(),
            "trigger.subject: \"invoices.>\" matches no subject of stream \"ORDERS\"",
        ),
        (
            format!("publish_ended: true\ntrigger: {{ stream: {run_ends} }}"),
            "trigger.subject: the flow announces its ends",
        ),
    ];
    for (head, problem) in refused {
        let bad = write("bad", &head)?;
        let (code, stdout, stderr) = deploy_files(&grid, &[&ok, &bad])?;
        assert_eq!(code, Some(2), "an invalid definition, as when deployed alone: {stdout}{stderr}");
        let reported = format!("invalid  {}: 1 problem(s)\n  {problem}", bad.display());
        assert!(stdout.contains(&reported), "{head}: the file and its problem are named: {stdout}");
        assert!(stderr.contains("nothing deployed"), "{stderr}");
        let deployed = client.flows().await?.flows;
        assert!(deployed.is_empty(), "{head}: nothing deployed, not even the file before: {deployed:?}");
    }

    // The trigger's consumer made first, as the grid's deploy asks, the work-queue stream serves.
    jobs.create_consumer(pull::Config {
        durable_name: Some(format!("{}_trigger_bad", grid.prefix)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    })
    .await?;
    let bad = write("bad", "trigger: { stream: JOBS }")?;
    let (code, stdout, stderr) = deploy_files(&grid, &[&ok, &bad])?;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["deployed ok version 1", "deployed bad version 1"]);
    Ok(())
}

/// Bad usage that clap finds itself (arguments that do not go together, a value it refuses,
/// from the command line or a variable) is, under `--json` or `FLOWGRID_JSON=true`, one JSON
/// answer on stdout as every other failure is: `invalid_request` with clap's message, in
/// plain text, and exit 2 (before, stdout was empty). Without it, and for help, stdout is as
/// it was.
#[test]
fn bad_usage_that_clap_finds_is_one_json_answer_under_json() -> anyhow::Result<()> {
    let run = |args: &[&str], variables: &[(&str, &str)]| -> anyhow::Result<(Option<i32>, String, String)> {
        let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
            .args(args)
            .env_remove("FLOWGRID_JSON")
            .env_remove("FLOWGRID_WAIT_TIMEOUT")
            // Colours on stderr, which the JSON message must not carry.
            .env("CLICOLOR_FORCE", "1")
            .envs(variables.iter().copied())
            .output()?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok((output.status.code(), text(&output.stdout), text(&output.stderr)))
    };
    /// The arguments, the variables set, and what the error says.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (&["--json", "shards", "--all", "--history", "5"], &[], "cannot be used with"),
        (&["--json", "run", "list", "--status", "done"], &[], "is not a run status"),
        (&["run", "list", "--status", "done", "--json"], &[], "is not a run status"),
        (&["run", "watch", "r", "--timeout", "367d"], &[("FLOWGRID_JSON", "true")], "longer than 366 days"),
        (&["--json", "run", "tail", "r"], &[("FLOWGRID_WAIT_TIMEOUT", "10000000000000000000")], "366 days"),
    ];
    for (args, variables, said) in cases {
        let (code, stdout, stderr) = run(args, variables)?;
        assert_eq!(code, Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(said) && stderr.contains('\u{1b}'), "{args:?}: clap's text, coloured: {stderr}");
        let answer: Value =
            serde_json::from_str(&stdout).map_err(|error| anyhow::anyhow!("{args:?}: {error}: {stdout:?}"))?;
        assert_eq!(answer["error"]["code"], json!("invalid_request"), "{args:?}: {answer}");
        assert_eq!(answer["error"]["retryable"], json!(false), "{args:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(said), "{args:?}: {answer}");
        assert!(!message.starts_with("error:") && !message.contains('\u{1b}'), "{args:?}: plain text: {message:?}");
    }
    let (code, stdout, stderr) = run(&["run", "list", "--status", "done"], &[])?;
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "without --json, clap's text alone: {stderr}");
    let (code, stdout, _) = run(&["--json", "shards", "--help"], &[])?;
    assert!(code == Some(0) && stdout.contains("One line per shard"), "help is help: {stdout}");
    Ok(())
}
