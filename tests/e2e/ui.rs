//! `flowgrid ui`: the web view shows the grid, a flow's graph and a run step by step, and
//! answers a wrong address with a page that says so.

use std::process::Command;
use std::time::Duration;

use flowgrid_sdk::{RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{free_port, http_get, http_post_form, wait_for, Grid};
use serde_json::json;

use crate::{deploy, OrLogs, RUN_DEADLINE};

const UI_FLOW: &str = r#"
name: ui-flow
description: Shown in the UI.
steps:
  - { id: first, kind: task, pool: a, task: echo }
  - id: route
    kind: choice
    after: [first]
    choices: [{ when: 'input.fast == true', next: quick }]
    default: slow
  - { id: quick, kind: transform, output: '"quick <b>path</b>"' }
  - { id: slow, kind: wait, duration_ms: 10 }
  - { id: approve, kind: signal, after: [first] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_shows_the_grid_a_flow_and_a_run_step_by_step() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, UI_FLOW).await?;
    let start = StartRun {
        flow: "ui-flow".into(),
        version: None,
        input: json!({"fast": true}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;

    let addr = start_ui(&mut grid, &[]).await?;

    let (status, overview) = http_get(&addr, "/")?;
    assert_eq!(status, 200, "{overview}");
    assert!(overview.contains("members: 1") && overview.contains("shards: "), "the grid's status: {overview}");
    assert!(overview.contains(r#"href="/flows/ui-flow""#), "the flow is listed: {overview}");
    assert!(overview.contains(&format!(r#"href="/runs/{run_id}""#)), "the run is listed: {overview}");
    // A limited flow's run that waits for a signal holds a slot: the overview and the
    // flow's page list the limit in use.
    deploy(&grid, &client, "name: ui-limited\nconcurrency: { max: 5 }\nsteps:\n  - { id: go, kind: signal }\n").await?;
    client.start(StartRun { flow: "ui-limited".into(), ..Default::default() }).await.or_logs(&grid)?;
    wait_for("the run's slot", RUN_DEADLINE, || async {
        let list = client.limits(Some("ui-limited")).await.ok()?;
        list.limits.first().filter(|limit| limit.going == 1).map(|_| ())
    })
    .await
    .or_logs(&grid)?;
    let (_, overview) = http_get(&addr, "/")?;
    assert!(overview.contains("Concurrency limits in use"), "{overview}");
    // The overview lists the flows a page at a time.
    let (status, next) = http_get(&addr, "/?flows_after=ui-flow")?;
    assert!(status == 200 && next.contains(r#"href="/flows/ui-limited""#), "{next}");
    assert!(!next.contains(r#"href="/flows/ui-flow""#), "{next}");
    // A page refuses a query parameter it does not take, or one given twice.
    for path in ["/?flow=x", "/flows/ui-flow?versoin=2", "/runs?labels=a=1", "/runs?label=a=1&label=b=2"] {
        let (status, page) = http_get(&addr, path)?;
        assert!(status == 400 && page.contains("<html"), "{path}: {status} {page}");
    }
    let (_, flow) = http_get(&addr, "/flows/ui-limited")?;
    assert!(
        flow.contains("Concurrency limits in use") && flow.contains("<td>5</td><td>-</td><td>queue</td><td>1</td>"),
        "{flow}"
    );

    let (status, flow) = http_get(&addr, "/flows/ui-flow")?;
    assert_eq!(status, 200, "{flow}");
    assert!(flow.contains("<svg") && flow.contains("Shown in the UI."), "{flow}");
    for step in ["first", "route", "quick", "slow", "approve"] {
        assert!(flow.contains(&format!("<title>{step} (")), "step {step} is drawn: {flow}");
    }

    // While the run waits for its signal, its page reloads itself and says how to send it.
    let (_, running) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert!(running.contains(r#"http-equiv="refresh""#), "a running run's page reloads: {running}");
    assert!(running.contains(&format!("flowgrid run signal {run_id} approve")), "{running}");
    assert!(running.contains("quick &lt;b&gt;path&lt;/b&gt;"), "outputs are escaped: {running}");

    client.signal(&run_id, "approve", json!("ok")).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let (_, ended) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert!(!ended.contains(r#"http-equiv="refresh""#), "an ended run's page stays: {ended}");
    assert!(ended.contains(r#"class="node succeeded""#) && ended.contains(r#"class="node skipped""#), "{ended}");
    // Its history, record by record, to the signal that ended it (escaped like every value).
    assert!(ended.contains("<h2>History</h2>") && ended.contains("started ui-flow@1 with input"), "{ended}");
    assert!(ended.contains("signal for step approve: &quot;ok&quot;"), "{ended}");

    let (status, runs) = http_get(&addr, "/runs?status=succeeded&flow=ui-flow")?;
    assert_eq!(status, 200, "{runs}");
    assert!(runs.contains(run_id.as_str()), "{runs}");

    // Runs by label; a signal step that keeps early signals says so before it starts.
    let early = "name: early\nsteps:\n  - { id: hold, kind: wait, duration_ms: 60000 }\n  - { id: paid, kind: signal, after: [hold], keep_early: true }\n";
    deploy(&grid, &client, early).await?;
    let labelled = StartRun {
        flow: "early".into(),
        labels: [("customer".to_owned(), "acme".to_owned())].into(),
        ..Default::default()
    };
    let waiting = client.start(labelled).await.or_logs(&grid)?.run_id;
    let (status, runs) = http_get(&addr, "/runs?label=customer%3Dacme")?;
    assert_eq!(status, 200, "{runs}");
    assert!(runs.contains(waiting.as_str()) && !runs.contains(run_id.as_str()), "{runs}");
    assert_eq!(http_get(&addr, "/runs?label=nokey")?.0, 400);
    // By when runs started: the labelled run started after the first one.
    let since = client.get(&waiting).await.or_logs(&grid)?.created_ms;
    let since = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(since)).to_string();
    let (status, runs) = http_get(&addr, &format!("/runs?since={since}"))?;
    assert_eq!(status, 200, "{runs}");
    assert!(runs.contains(waiting.as_str()) && !runs.contains(run_id.as_str()), "{runs}");
    assert!(runs.contains(&format!("value=\"{since}\"")), "the form shows the time: {runs}");
    let (status, runs) = http_get(&addr, &format!("/runs?until={since}"))?;
    assert!(status == 200 && runs.contains(run_id.as_str()) && !runs.contains(waiting.as_str()), "{runs}");
    let (status, page) = http_get(&addr, "/runs?since=soonish")?;
    assert!(status == 400 && page.contains("use e.g."), "{page}");
    let (_, page) = http_get(&addr, &format!("/runs/{waiting}"))?;
    assert!(page.contains("keeps a signal sent before it starts") && page.contains("customer=acme"), "{page}");
    assert!(page.contains(&format!("flowgrid run signal {waiting} paid")), "{page}");
    let (status, page) = http_get(&addr, "/runs?status=bogus")?;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("is not a run status"), "{page}");
    let (status, page) = http_get(&addr, "/runs/no-such-run")?;
    assert_eq!(status, 404, "{page}");
    let (status, _) = http_get(&addr, "/flows/no-such-flow")?;
    assert_eq!(status, 404);
    Ok(())
}

/// Starts `flowgrid ui` on a free port of the grid, with `more` flags; returns its address.
pub(crate) async fn start_ui(grid: &mut Grid, more: &[&str]) -> anyhow::Result<String> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut ui = Command::new(flowgrid_tests::flowgrid_bin());
    ui.args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "ui", "--listen", &addr]).args(more);
    grid.spawn_worker("ui", &mut ui)?;
    wait_for("the UI to answer", RUN_DEADLINE, || async { http_get(&addr, "/").ok() }).await?;
    Ok(addr)
}

/// The value of the form token in a page of a UI started with `--actions`.
fn token_of(page: &str) -> String {
    field_of(page, "token")
}

/// The value of the first form field named `name` in `page`.
fn field_of(page: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = page.find(&marker).unwrap_or_else(|| panic!("no form field {name} in {page}")) + marker.len();
    page[start..].chars().take_while(|character| *character != '"').collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut body = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        body.append_pair(name, value);
    }
    body.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_actions_the_ui_deploys_starts_signals_pauses_cancels_and_redrives_and_without_it_refuses(
) -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let read_only = start_ui(&mut grid, &[]).await?;
    let (_, overview) = http_get(&read_only, "/")?;
    assert!(!overview.contains(r#"name="token""#), "a read-only UI shows no form: {overview}");
    let (status, _, page) = http_post_form(&read_only, "/flows", &form(&[("token", ""), ("definition", UI_FLOW)]))?;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("read-only"), "{page}");
    // Whatever a form holds, a read-only UI refuses it as such, not as a malformed form.
    let (status, _, page) = http_post_form(&read_only, "/runs/some-run/cancel", "reason=x")?;
    assert!(status == 403 && page.contains("read-only"), "{status}: {page}");
    assert!(client.flows().await?.flows.is_empty(), "nothing was deployed");

    assert_eq!(http_get(&read_only, "/deploy")?.0, 403, "a read-only UI has no deploy form");

    let addr = start_ui(&mut grid, &["--actions"]).await?;
    let (status, deploy_page) = http_get(&addr, "/deploy")?;
    assert_eq!(status, 200, "{deploy_page}");
    let token = token_of(&deploy_page);
    let (status, _, _) = http_post_form(&addr, "/flows", &form(&[("token", "forged"), ("definition", UI_FLOW)]))?;
    assert_eq!(status, 403, "a form without this UI's token is refused");
    let (status, _, page) = http_post_form(&addr, "/flows", &form(&[("token", &token), ("definition", "name: [")]))?;
    assert_eq!(status, 400, "a bad definition is refused with its problems: {page}");

    // A scheduled flow's page pauses its schedule.
    let hourly =
        "name: hourly\nschedule: { every_ms: 3600000 }\nsteps:\n  - { id: s, kind: task, pool: a, task: echo }\n";
    deploy(&grid, &client, hourly).await?;
    let (_, page) = http_get(&addr, "/flows/hourly")?;
    assert!(page.contains("Pause its schedule and trigger"), "{page}");
    let (status, _, _) = http_post_form(&addr, "/flows/hourly/pause", &form(&[("token", &token)]))?;
    assert_eq!(status, 303);
    let (_, page) = http_get(&addr, "/flows/hourly")?;
    assert!(page.contains("paused from the web UI") && page.contains("Resume its schedule and trigger"), "{page}");

    let (status, location, _) = http_post_form(&addr, "/flows", &form(&[("token", &token), ("definition", UI_FLOW)]))?;
    assert_eq!((status, location.as_deref()), (303, Some("/flows/ui-flow?version=1")));
    let (status, location, _) = http_post_form(
        &addr,
        "/runs",
        &form(&[("token", &token), ("flow", "ui-flow"), ("input", r#"{"fast": false}"#)]),
    )?;
    assert_eq!(status, 303);
    let run_path = location.expect("the new run's page");
    let run_id = flowgrid_sdk::RunId(run_path.trim_start_matches("/runs/").into());
    wait_for("the run to wait for its signal", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        (flowgrid_tests::step(&view, "approve").status == flowgrid_sdk::StepStatus::Running).then_some(())
    })
    .await?;
    // A field the form does not have is refused, rather than quietly dropped.
    let versioned = form(&[("token", &token), ("flow", "ui-flow"), ("input", "{}"), ("version", "1")]);
    let (status, _, body) = http_post_form(&addr, "/runs", &versioned)?;
    assert!((400..500).contains(&status) && body.contains("version"), "{status}: {body}");
    let (_, waiting) = http_get(&addr, &run_path)?;
    assert!(waiting.contains("Send the signal"), "{waiting}");
    assert!(!waiting.contains(r#"http-equiv="refresh""#), "a page with a form to fill in does not reload: {waiting}");
    let (status, _, _) = http_post_form(
        &addr,
        &format!("{run_path}/signal"),
        &form(&[("token", &token), ("step", "approve"), ("data", r#"{"by": "web"}"#)]),
    )?;
    assert_eq!(status, 303);
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert_eq!(flowgrid_tests::step(&view, "approve").output, Some(json!({"by": "web"})));
    // A second signal is not taken, and the page says so rather than going back quietly.
    let again = form(&[("token", &token), ("step", "approve"), ("data", "1")]);
    let (status, _, body) = http_post_form(&addr, &format!("{run_path}/signal"), &again)?;
    assert!(status == 409 && body.contains("not applied: step approve took a signal already"), "{status} {body}");

    // The succeeded run's page offers a redrive from a step: the signal step waits again.
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains("Redrive from this step") && page.contains(r#"<option value="approve">"#), "{page}");
    let redrive = form(&[("token", &token), ("from", "approve")]);
    let (status, _, _) = http_post_form(&addr, &format!("{run_path}/redrive"), &redrive)?;
    assert_eq!(status, 303);
    let view = client.get(&run_id).await?;
    let approve = flowgrid_tests::step(&view, "approve");
    assert_eq!((view.status, approve.status, approve.output.clone()), (RunStatus::Running, StepStatus::Running, None));

    // A start with labels and a start time waits, delayed, with its labels; a bad time is
    // refused with what to write and starts nothing.
    let (status, location, _) = http_post_form(
        &addr,
        "/runs",
        &form(&[("token", &token), ("flow", "ui-flow"), ("labels", "customer=acme, source=web"), ("at", "2h")]),
    )?;
    assert_eq!(status, 303);
    let delayed = flowgrid_sdk::RunId(location.expect("its page").trim_start_matches("/runs/").into());
    let view = client.get(&delayed).await?;
    assert!(view.delayed.is_some() && view.labels.get("customer").map(String::as_str) == Some("acme"), "{view:?}");
    assert_eq!(view.labels.get("source").map(String::as_str), Some("web"), "{view:?}");
    let before = client.list(flowgrid_sdk::ListRuns { flow: Some("ui-flow".into()), ..Default::default() }).await?;
    let (status, _, body) =
        http_post_form(&addr, "/runs", &form(&[("token", &token), ("flow", "ui-flow"), ("at", "next tuesday")]))?;
    assert!(status == 400 && body.contains("neither a time nor a duration"), "{status} {body}");
    let after = client.list(flowgrid_sdk::ListRuns { flow: Some("ui-flow".into()), ..Default::default() }).await?;
    assert_eq!(before.runs.len(), after.runs.len(), "a refused start starts nothing");
    // An input near the 1 MiB limit whose quotes triple in the form's encoding still goes through.
    let quoted = serde_json::to_string(&vec![r#"x"y"#; 130_000])?;
    assert!(quoted.len() > 900_000 && quoted.len() < 1 << 20, "{}", quoted.len());
    let large = form(&[("token", &token), ("flow", "ui-flow"), ("input", &quoted), ("at", "2h")]);
    assert!(large.len() > 2 << 20, "over the former 2 MB bound once encoded: {}", large.len());
    let (status, location, body) = http_post_form(&addr, "/runs", &large)?;
    assert_eq!(status, 303, "{body}");
    let large_run = RunId(location.expect("the run's page").trim_start_matches("/runs/").to_owned().into());
    client.cancel(&large_run, "not needed").await?;
    client.cancel(&delayed, "not needed").await?;

    // The flow page's form carries a key of its own: the same form sent twice starts one run,
    // and the page says so; the form sent again with another input (back, edit, send)
    // starts another run with that input.
    let (_, flow_page) = http_get(&addr, "/flows/ui-flow")?;
    let key = field_of(&flow_page, "key");
    let start = form(&[("token", &token), ("flow", "ui-flow"), ("input", r#"{"fast": true}"#), ("key", &key)]);
    let (status, location, _) = http_post_form(&addr, "/runs", &start)?;
    assert_eq!(status, 303);
    let run_path = location.expect("the new run's page");
    let (status, again, page) = http_post_form(&addr, "/runs", &start)?;
    assert!(status == 200 && again.is_none(), "{status}: {page}");
    assert!(page.contains("This form was sent already") && page.contains(&format!(r#"href="{run_path}""#)), "{page}");
    let edited = form(&[("token", &token), ("flow", "ui-flow"), ("input", r#"{"fast": false}"#), ("key", &key)]);
    let (status, other, page) = http_post_form(&addr, "/runs", &edited)?;
    assert_eq!(status, 303, "{page}");
    let other = flowgrid_sdk::RunId(other.expect("its page").trim_start_matches("/runs/").into());
    assert_ne!(format!("/runs/{other}"), run_path, "an edited form starts a run of its own");
    assert_eq!(client.get(&other).await?.input, json!({"fast": false}), "with the input sent");
    client.cancel(&other, "not needed").await?;
    let (_, next_page) = http_get(&addr, "/flows/ui-flow")?;
    assert_ne!(field_of(&next_page, "key"), key, "each view of the page starts a run of its own");
    let run_id = flowgrid_sdk::RunId(run_path.trim_start_matches("/runs/").into());
    // A running run's page pauses it (with the reason given), then resumes it.
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains(r#"name="reason""#), "the forms take a reason: {page}");
    let pause = form(&[("token", &token), ("reason", "waiting for the vendor")]);
    let (status, _, _) = http_post_form(&addr, &format!("{run_path}/pause"), &pause)?;
    assert_eq!(status, 303);
    let paused = client.get(&run_id).await?.paused.expect("paused from the page");
    assert_eq!(paused.reason, "waiting for the vendor");
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains("Resume this run") && page.contains("waiting for the vendor"), "{page}");
    // A form from before a restart is refused with a link to the page it came from, which
    // has the token of now (the address bar holds the form's target: reloading it sends the
    // same form again).
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/pause"), &form(&[("token", "stale")]))?;
    assert!(status == 403 && page.contains(&format!(r#"href="{run_path}""#)), "{status}: {page}");
    // A form without its token field is refused with the UI's page, saying what is missing.
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/resume"), "reason=x")?;
    assert!(status == 422 && page.contains("missing field `token`") && page.contains("<html"), "{status}: {page}");
    let (status, _, _) = http_post_form(&addr, &format!("{run_path}/resume"), &form(&[("token", &token)]))?;
    assert_eq!(status, 303);
    assert_eq!(client.get(&run_id).await?.paused, None, "resumed from the page");
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/resume"), &form(&[("token", &token)]))?;
    assert!(status == 409 && page.contains("nothing changed: the run is not paused"), "{status}: {page}");
    let (status, _, _) = http_post_form(&addr, &format!("{run_path}/cancel"), &form(&[("token", &token)]))?;
    assert_eq!(status, 303);
    let view = client.get(&run_id).await?;
    assert_eq!(view.status, RunStatus::Cancelled, "{view:?}");
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/cancel"), &form(&[("token", &token)]))?;
    assert!(status == 409 && page.contains("the run had already ended (cancelled)"), "{status}: {page}");

    // The cancelled run's page offers a redrive: the cancelled signal step waits again.
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains(&format!(r#"action="{run_path}/redrive""#)), "{page}");
    let (status, _, _) = http_post_form(&addr, &format!("{run_path}/redrive"), &form(&[("token", &token)]))?;
    assert_eq!(status, 303);
    let view = client.get(&run_id).await?;
    assert_eq!(view.status, RunStatus::Running, "{view:?}");
    // Its first step may have been cancelled too: then it runs again before the signal step waits.
    wait_for("the signal step to wait again", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        (flowgrid_tests::step(&view, "approve").status == StepStatus::Running).then_some(())
    })
    .await?;
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains("Redriven") && page.contains("once, last at"), "{page}");

    // A step handed off as an async task is completed from its run's page, once.
    let review = "name: review\nsteps:\n  - { id: check, kind: task, pool: a, task: hand_off, timeout_ms: 60000 }\n";
    deploy(&grid, &client, review).await?;
    let run_id = client.start(StartRun { flow: "review".into(), ..Default::default() }).await?.run_id;
    let run_path = format!("/runs/{run_id}");
    let task_token = wait_for("the task token", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        flowgrid_tests::step(&view, "check").progress.as_ref()?["token"].as_str().map(str::to_owned)
    })
    .await?;
    let (_, page) = http_get(&addr, &run_path)?;
    assert!(page.contains("was handed off as an async task") && page.contains("Complete the task"), "{page}");
    let complete =
        form(&[("token", &token), ("task_token", &task_token), ("output", r#"{"ok": true}"#), ("error", "")]);
    // Only on its own run's page.
    let (status, _, page) = http_post_form(&addr, "/runs/another-run/complete", &complete)?;
    assert!(status == 400 && page.contains("not of run another-run"), "{status}: {page}");
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/complete"), &complete)?;
    assert_eq!(status, 303, "{page}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(json!({"check": {"ok": true}}))));
    let (status, _, page) = http_post_form(&addr, &format!("{run_path}/complete"), &complete)?;
    assert!(status == 409 && page.contains("not applied"), "{status}: {page}");
    Ok(())
}

/// One raw HTTP/1.0 request (`Host` as given), with a short read timeout: the status code,
/// or an error when no answer came in time.
fn raw_status(addr: &str, request: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(request.as_bytes())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(String::from_utf8_lossy(&head[9..12]).parse()?)
}

/// On every address the UI answers only for names it knows (a rebound name gets 403), and
/// its API refuses a change without the token before it reads the change's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_answers_known_names_only_and_refuses_changes_before_their_body() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let port = free_port()?;
    let listen = format!("0.0.0.0:{port}");
    let mut ui = Command::new(flowgrid_tests::flowgrid_bin());
    ui.args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "ui", "--listen", &listen, "--actions"]);
    ui.args(["--allowed-host", "flowgrid.test"]);
    grid.spawn_worker("ui", &mut ui)?;
    let addr = format!("127.0.0.1:{port}");
    wait_for("the UI to answer", RUN_DEADLINE, || async { http_get(&addr, "/").ok() }).await.or_logs(&grid)?;
    let get = |host: &str| format!("GET /deploy HTTP/1.0\r\nHost: {host}\r\n\r\n");
    for (host, status) in [
        (format!("rebind.evil:{port}"), 403),
        ("flowgrid.test.evil".to_owned(), 403),
        (format!("flowgrid.test:{port}"), 200),
        (format!("10.1.2.3:{port}"), 200),
        (format!("localhost:{port}"), 200),
        // A name that is not plain ASCII is no name the UI answers for, not a missing one.
        (format!("flowgrid.t\u{e9}st:{port}"), 403),
        ("\u{e9}".to_owned(), 403),
    ] {
        assert_eq!(raw_status(&addr, &get(&host))?, status, "{host}\n{}", grid.logs());
    }
    // A read-only API: a start announcing 6 MB that never come is refused at once.
    let start = format!(
        "POST /api/runs HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 6000000\r\n\r\n"
    );
    assert_eq!(raw_status(&addr, &start)?, 403, "{}", grid.logs());
    // A path that is no call is that, token or not.
    let nothing = format!("POST /api/nosuch HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(raw_status(&addr, &nothing)?, 404, "{}", grid.logs());
    Ok(())
}

/// Connections a test holds open at once: over the UI's bound on connections (512).
const CONNECTIONS_OVER_BOUND: usize = 600;
/// Requests with a body the UI reads at once.
const BODIES_READ_MAX: usize = 16;
/// How long a stalled request may hold its connection before the test fails: well over
/// the UI's bounds on reading a request's head and body (10 s each without a byte).
const STALL_DEADLINE: Duration = Duration::from_secs(30);

/// What a connection that sent `request` and then nothing more gets within `within`: the
/// status of an answer, `None` when it was closed without one; an error when neither came.
fn answer_within(stream: &mut std::net::TcpStream, within: Duration) -> anyhow::Result<Option<u16>> {
    use std::io::Read;
    stream.set_read_timeout(Some(within))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while head.len() < 12 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => anyhow::bail!("neither an answer nor a close within {within:?}: {error}"),
        }
    }
    Ok((head.len() == 12).then(|| String::from_utf8_lossy(&head[9..12]).parse()).transpose()?)
}

/// A client that stops sending in the middle of a request's head, or of its body, is let go
/// within the UI's bounds, and connections beyond its bound wait for one to end: stalled
/// clients cannot hold the UI (and its file descriptors) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_lets_stalled_requests_go_and_bounds_its_connections() -> anyhow::Result<()> {
    use std::io::Write;
    let mut grid = Grid::start(&[]).await?;
    let addr = start_ui(&mut grid, &["--actions"]).await?;

    // Connections that send nothing, over the bound: a request after them is not answered
    // while they are open, and is once they are closed.
    let silent: Vec<std::net::TcpStream> =
        (0..CONNECTIONS_OVER_BOUND).map(|_| std::net::TcpStream::connect(&addr)).collect::<Result<_, _>>()?;
    let mut waiting = std::net::TcpStream::connect(&addr)?;
    waiting.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let early = answer_within(&mut waiting, Duration::from_secs(1));
    assert!(early.is_err(), "answered with {CONNECTIONS_OVER_BOUND} connections open: {early:?}");
    drop(silent);
    assert_eq!(answer_within(&mut waiting, STALL_DEADLINE)?, Some(200), "{}", grid.logs());

    // Forms whose bodies do not come, as many as the UI reads at once: one more is refused at
    // once (503) rather than read beside them.
    let post = format!(
        "POST /runs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 6000000\r\n\r\ntoken=x&flow="
    );
    let mut reading = Vec::new();
    for _ in 0..BODIES_READ_MAX {
        let mut stalled = std::net::TcpStream::connect(&addr)?;
        stalled.write_all(post.as_bytes())?;
        reading.push(stalled);
    }
    // Once every one of them is being read (the UI takes them in its own time), the next is
    // refused: more than the bound are never read at once.
    let refused = (0..4).find_map(|_| {
        let mut one_more = std::net::TcpStream::connect(&addr).ok()?;
        one_more.write_all(post.as_bytes()).ok()?;
        let answer = answer_within(&mut one_more, Duration::from_secs(2)).ok().flatten();
        reading.push(one_more);
        answer
    });
    assert_eq!(refused, Some(503), "{}", grid.logs());
    drop(reading);

    // A head without its closing blank line, and a form that announces 6 MB and sends a few
    // bytes: both connections are let go (the body's with a 408).
    let mut head = std::net::TcpStream::connect(&addr)?;
    head.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())?;
    let mut body = std::net::TcpStream::connect(&addr)?;
    body.write_all(post.as_bytes())?;
    let head_answer = answer_within(&mut head, STALL_DEADLINE).map_err(|error| anyhow::anyhow!("the head: {error}"))?;
    assert!(head_answer.is_none_or(|status| status == 408), "{head_answer:?}");
    let body_answer = answer_within(&mut body, STALL_DEADLINE).map_err(|error| anyhow::anyhow!("the body: {error}"))?;
    assert_eq!(body_answer, Some(408), "{}", grid.logs());
    // The UI answers as before.
    assert_eq!(http_get(&addr, "/")?.0, 200);
    Ok(())
}

/// A refusal of the grid shows its located problems (an input against the flow's
/// `input_schema`); a GET of a form's target answers the UI's page, with a link to the page
/// the form is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_shows_a_refusals_problems_and_answers_a_get_of_a_forms_target() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let schema = "name: schema-ui\ninput_schema: { type: object, required: [video] }\nsteps:\n  - { id: t, kind: transform, output: 'input.video' }\n";
    deploy(&grid, &client, schema).await?;
    let addr = start_ui(&mut grid, &["--actions"]).await?;
    let (_, flow_page) = http_get(&addr, "/flows/schema-ui")?;
    let token = token_of(&flow_page);
    let start = form(&[("token", &token), ("flow", "schema-ui"), ("input", "{}")]);
    let (status, _, page) = http_post_form(&addr, "/runs", &start)?;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("does not match the input_schema of flow `schema-ui`"), "{page}");
    assert!(page.contains("<li><code>input</code>: &quot;video&quot; is a required property</li>"), "{page}");
    assert!(page.contains(r#"href="/flows/schema-ui""#), "a link back to the form's page: {page}");

    for (path, back) in
        [("/flows", "/deploy"), ("/runs/x/cancel", "/runs/x"), ("/flows/schema-ui/pause", "/flows/schema-ui")]
    {
        let (status, page) = http_get(&addr, path)?;
        assert!(status == 405 && page.contains("<html"), "{path}: {status} {page}");
        assert!(page.contains(&format!(r#"href="{back}""#)), "{path}: {page}");
    }
    // The API answers its own way still.
    let (status, body) = http_get(&addr, "/api/runs/x/cancel")?;
    assert!(status == 405 && body.contains("method_not_allowed"), "{status}: {body}");
    Ok(())
}
