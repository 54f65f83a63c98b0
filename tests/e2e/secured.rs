//! A grid on a secured nats-server: TLS with the grid's own certificate authority, and
//! clients that must authenticate (password, NKey, token). Every process takes the same
//! `--nats-*` flags or `FLOWGRID_NATS_*` variables.

use std::path::{Path, PathBuf};
use std::process::Command;

use flowgrid_sdk::{NatsOptions, RunStatus, StartRun};
use flowgrid_tests::{flowgrid_bin, Grid};
use futures::StreamExt;
use serde_json::json;

use crate::{deploy, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// A certificate authority and a server certificate for 127.0.0.1 it signed, as PEM files
/// in `dir`: `ca.pem`, `server.pem`, `server-key.pem`.
pub(crate) fn write_certificates(dir: &Path) -> anyhow::Result<PathBuf> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "flowgrid test authority");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let server_key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&server_key, &ca)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("server.pem"), server.pem())?;
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem())?;
    Ok(dir.join("ca.pem"))
}

/// `flowgrid ARGS` against `grid` with only the variables `env` (not the grid's own).
fn cli_as(grid: &Grid, env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<(bool, String)> {
    let (ok, stdout, stderr) = grid.cli_with_env(env, args)?;
    Ok((ok, format!("{stdout}{stderr}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_behind_tls_and_passwords_runs_flows_and_refuses_who_lacks_them() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    let ca = write_certificates(certs.path())?;
    let ca_text = ca.display().to_string();
    let user = nkeys::KeyPair::new_user();
    let seed_file = certs.path().join("reader.nk");
    std::fs::write(&seed_file, user.seed()?)?;
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\nauthorization {{\n  users: [\n    {{ user: grid, password: \
         \"grid-secret\" }}\n    {{ nkey: {} }}\n  ]\n}}\n",
        certs.path().join("server.pem").display(),
        certs.path().join("server-key.pem").display(),
        user.public_key(),
    );
    let mut grid = Grid::start_nats_with_config(&config)?;
    grid.env = vec![
        ("FLOWGRID_NATS_USER".into(), "grid".into()),
        ("FLOWGRID_NATS_PASSWORD".into(), "grid-secret".into()),
        ("FLOWGRID_NATS_TLS_CA".into(), ca_text.clone()),
    ];
    grid.nats_options = NatsOptions {
        user: Some("grid".into()),
        password: Some("grid-secret".into()),
        tls_ca: Some(ca.clone()),
        ..NatsOptions::default()
    };
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 4)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;

    // The CLI with the grid's variables starts a run and waits for it.
    let (ok, text, errors) = grid.cli(&["--json", "run", "start", "echo-once", "--input", r#"{"n": 1}"#, "--wait"])?;
    assert!(ok, "run start over TLS with a password failed: {text}{errors}\n{}", grid.logs());
    let view: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(view["status"], json!("succeeded"), "{text}");
    assert_eq!(view["output"], json!({"n": 1}), "{text}");

    // Another user, by NKey, with the flags instead of variables.
    let seed = seed_file.display().to_string();
    let (ok, text) = cli_as(&grid, &[], &["--nats-nkey", &seed, "--nats-tls-ca", &ca_text, "run", "list"])?;
    assert!(ok && text.contains("echo-once") && text.contains("succeeded"), "run list as the NKey user: {text}");
    let by_nkey = flowgrid_sdk::Client::connect_with(
        &grid.nats_url,
        grid.prefix.clone(),
        &NatsOptions { nkey: Some(seed_file.clone()), tls_ca: Some(ca.clone()), ..NatsOptions::default() },
    )
    .await?;
    let run = by_nkey.start(StartRun { flow: "echo-once".into(), input: json!(2), ..Default::default() }).await?;
    let view = grid.wait_run(&by_nkey, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");

    // Without credentials, with a wrong password, without the authority, or in the clear:
    // refused, each saying what to check.
    let (ok, text) = cli_as(&grid, &[("FLOWGRID_NATS_TLS_CA", &ca_text)], &["run", "list"])?;
    assert!(!ok && text.contains("authorization violation") && text.contains("--nats-user"), "no credentials: {text}");
    let wrong =
        [("FLOWGRID_NATS_TLS_CA", ca_text.as_str()), ("FLOWGRID_NATS_USER", "grid"), ("FLOWGRID_NATS_PASSWORD", "x")];
    let (ok, text) = cli_as(&grid, &wrong, &["run", "list"])?;
    assert!(!ok && text.contains("authorization violation"), "a wrong password: {text}");
    let no_ca = [("FLOWGRID_NATS_USER", "grid"), ("FLOWGRID_NATS_PASSWORD", "grid-secret")];
    let (ok, text) = cli_as(&grid, &no_ca, &["run", "list"])?;
    assert!(!ok && text.contains("TLS") && text.contains("--nats-tls-ca"), "an unknown authority: {text}");
    let no_file = [("FLOWGRID_NATS_TLS_CA", "missing-ca.pem"), ("FLOWGRID_NATS_USER", "grid")];
    let (ok, text) = cli_as(&grid, &no_file, &["run", "list"])?;
    assert!(!ok && text.contains("missing-ca.pem") && text.contains("--nats-tls-ca"), "a missing file: {text}");

    // The user and password in the URL instead (`nats://user:password@host`); a refusal
    // shows the URL without the password.
    let url_as = |url: &str| -> anyhow::Result<(bool, String)> {
        let output = Command::new(flowgrid_bin())
            .args(["--nats-url", url, "--nats-tls-ca", &ca_text, "--prefix", &grid.prefix, "run", "list"])
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        Ok((output.status.success(), text))
    };
    let (ok, text) = url_as(&grid.nats_url.replacen("://", "://grid:grid-secret@", 1))?;
    assert!(ok && text.contains("echo-once"), "credentials in the URL: {text}");
    let (ok, text) = url_as(&grid.nats_url.replacen("://", "://grid:not-the-secret@", 1))?;
    assert!(!ok && text.contains("authorization violation") && text.contains("grid:***@"), "{text}");
    assert!(!text.contains("not-the-secret"), "the password is shown: {text}");

    // A coordinator without credentials does not join; the one serving is unaffected.
    let mut refused = Command::new(flowgrid_bin());
    refused.args(["--nats-url", &grid.nats_url, "--nats-tls-ca", &ca_text, "coordinator", "--metrics-addr", "off"]);
    let output = refused.arg("--data-dir").arg(grid.dir.path().join("other")).output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("authorization violation"), "coordinator: {text}");
    let view = client.get(&run.run_id).await.or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Succeeded);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_on_a_server_with_a_token_serves_whoever_has_it() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("authorization { token: \"grid-token\" }")?;
    grid.env = vec![("FLOWGRID_NATS_TOKEN".into(), "grid-token".into())];
    grid.nats_options = NatsOptions { token: Some("grid-token".into()), ..NatsOptions::default() };
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 4)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let run = client.start(StartRun { flow: "echo-once".into(), input: json!("t"), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let (ok, text) = cli_as(&grid, &[], &["--nats-token", "grid-token", "run", "get", run.run_id.as_str()])?;
    assert!(ok && text.contains("succeeded"), "{text}");
    let (ok, text) = cli_as(&grid, &[("FLOWGRID_NATS_TOKEN", "other")], &["run", "get", run.run_id.as_str()])?;
    assert!(!ok && text.contains("authorization violation"), "{text}");
    let (ok, text) = cli_as(&grid, &[("FLOWGRID_NATS_TOKEN", "t"), ("FLOWGRID_NATS_USER", "u")], &["status"])?;
    assert!(!ok && text.contains("--nats-token and --nats-user"), "{text}");
    Ok(())
}

/// What a worker of pool `a` needs, and nothing more (operations.md, "Securing NATS").
const WORKER_A_PERMISSIONS: &str = r#"{
        publish: { allow: [
          "$JS.API.STREAM.INFO.FLOWGRID_TASKS",
          "$JS.API.CONSUMER.INFO.FLOWGRID_TASKS.pool-a",
          "$JS.API.CONSUMER.CREATE.FLOWGRID_TASKS.pool-a.flowgrid.tasks.a",
          "$JS.API.CONSUMER.MSG.NEXT.FLOWGRID_TASKS.pool-a",
          "$JS.ACK.FLOWGRID_TASKS.pool-a.>",
          "$JS.API.CONSUMER.INFO.FLOWGRID_TASKS.pool9-a",
          "$JS.API.CONSUMER.MSG.NEXT.FLOWGRID_TASKS.pool9-a",
          "$JS.ACK.FLOWGRID_TASKS.pool9-a.>",
          "flowgrid.shard.*.result",
          "flowgrid.live.>",
          "$JS.API.STREAM.INFO.KV_FLOWGRID_WORKERS",
          "$KV.FLOWGRID_WORKERS.a.>"
        ] }
        subscribe: { allow: ["_INBOX_worker_a.>", "flowgrid.cancels.a", "flowgrid.lanes.a"] }
      }"#;

/// What a service that deploys flows, starts, reads and tails runs, and submits durably
/// needs; the calls coordinators make of each other are denied.
const APP_PERMISSIONS: &str = r#"{
        publish: { allow: [
          "flowgrid.api.>", "flowgrid.submit", "$JS.API.STREAM.INFO.FLOWGRID_SUBMIT",
          "$JS.API.STREAM.INFO.FLOWGRID_LIVE", "$JS.API.CONSUMER.CREATE.FLOWGRID_LIVE",
          "$JS.API.CONSUMER.MSG.NEXT.FLOWGRID_LIVE.>"
        ], deny: [
          "flowgrid.api.run.start_child", "flowgrid.api.run.child_ended", "flowgrid.api.gate.>",
          "flowgrid.api.run.admit"
        ] }
        subscribe: { allow: ["_INBOX_app.>"] }
      }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_allowed_only_its_pools_subjects_serves_the_pool() -> anyhow::Result<()> {
    let config = format!(
        "authorization {{\n  users: [\n    {{ user: grid, password: grid-secret }}\n    {{ user: worker-a, password: \
         worker-secret, permissions: {WORKER_A_PERMISSIONS} }}\n    {{ user: app, password: app-secret, permissions: \
         {APP_PERMISSIONS} }}\n  ]\n}}\n"
    );
    let mut grid = Grid::start_nats_with_config(&config)?;
    grid.env =
        vec![("FLOWGRID_NATS_USER".into(), "grid".into()), ("FLOWGRID_NATS_PASSWORD".into(), "grid-secret".into())];
    // The coordinators and the CLI connect as `grid`, the test's own client as `app`.
    grid.nats_options = NatsOptions {
        user: Some("app".into()),
        password: Some("app-secret".into()),
        inbox_prefix: Some("_INBOX_app".into()),
        ..NatsOptions::default()
    };
    grid.start_coordinator().await?;
    // The worker starts before any task of its pool exists: it makes the pool's consumer.
    let mut worker = Command::new(flowgrid_bin());
    worker
        .args(["--nats-url", &grid.nats_url, "worker", "--pools", "a", "--speed", "0"])
        .env("FLOWGRID_NATS_USER", "worker-a")
        .env("FLOWGRID_NATS_PASSWORD", "worker-secret")
        .env("FLOWGRID_NATS_INBOX_PREFIX", "_INBOX_worker_a");
    grid.spawn_worker("worker-a", &mut worker)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    deploy(
        &grid,
        &client,
        "name: review\nsteps:\n  - { id: approve, kind: task, pool: a, task: hand_off, timeout_ms: 60000 }\n",
    )
    .await?;

    let run = client.start(StartRun { flow: "echo-once".into(), input: json!("w"), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!("w")));
    let submitted =
        client.submit(StartRun { flow: "echo-once".into(), input: json!("s"), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &submitted.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.output, Some(json!("s")), "{view:?}");
    // A handed-off task: its progress report (the token) travels on the result subject.
    let review = client.start(StartRun { flow: "review".into(), input: json!(1), ..Default::default() }).await?;
    let token = flowgrid_tests::wait_for("the handed-off task's token", RUN_DEADLINE, || async {
        let view = client.get(&review.run_id).await.ok()?;
        flowgrid_tests::step(&view, "approve").progress.as_ref()?["token"].as_str().map(str::to_owned)
    })
    .await?;
    let (ok, text, errors) = grid.cli(&["task", "complete", &token, "--output", "true"])?;
    assert!(ok, "{text}{errors}");
    let view = grid.wait_run(&client, &review.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    // A task of priority 9 goes through the pool's lane 9; the worker's live output
    // reaches the app that tails the run.
    deploy(
        &grid,
        &client,
        "name: urgent\nsteps:\n  - { id: answer, kind: task, pool: a, task: generate, priority: 9, input: '#{ prompt: \"hi\" }' }\n",
    )
    .await?;
    let urgent = client.start(StartRun { flow: "urgent".into(), input: json!({}), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &urgent.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let mut tail = client.tail(&urgent.run_id, Some("answer")).await?;
    let mut said = String::new();
    while !said.ends_with("hi") {
        let piece = tokio::time::timeout(RUN_DEADLINE, tail.next()).await?.expect("a piece of live output")?;
        said.push_str(piece.data.as_str().unwrap_or_default());
    }
    assert_eq!(said, "Generated reply to: hi");
    drop(tail);
    // Its record, written under its pool's name only.
    let (ok, text, errors) = grid.cli(&["workers", "--pool", "a"])?;
    assert!(ok && text.lines().nth(1).is_some_and(|line| line.starts_with("a ")), "{text}{errors}");
    // Every subject the worker used (its pull requests, acks, results, progress, and its
    // subscription to the pool's cancel notices) and the app used was allowed.
    let server_log = grid.nats.log_tail(10_000);
    assert!(
        !server_log.contains("Violation"),
        "the worker or the app used a subject its permissions do not allow:\n{server_log}"
    );
    // The app cannot pass for a coordinator: a child's end it makes up is not delivered.
    let nats = grid.nats_client().await?;
    let forged = json!({"parent": review.run_id, "step": "approve", "child": run.run_id, "status": "succeeded"});
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).api("run.child_ended");
    let request = async_nats::Request::new()
        .payload(serde_json::to_vec(&forged)?.into())
        .timeout(Some(std::time::Duration::from_secs(1)));
    assert!(nats.send_request(subject, request).await.is_err(), "a forged child's end was answered");
    let server_log = grid.nats.log_tail(10_000);
    assert!(server_log.contains("Publish Violation") && server_log.contains("run.child_ended"), "{server_log}");

    // A task on a lane the worker is not allowed (priority 7) waits for a worker that is;
    // the worker's other lanes go on as before. Before, its requests for that lane's
    // consumer, which NATS does not answer, held every pull of the worker for 20 s.
    deploy(&grid, &client, "name: lane7\nsteps:\n  - { id: answer, kind: task, pool: a, task: echo, priority: 7 }\n")
        .await?;
    client.start(StartRun { flow: "lane7".into(), input: json!({}), ..Default::default() }).await?;
    // The worker found the lane and asked for its consumer, which NATS denied.
    let asked = flowgrid_tests::wait_for("the worker's request for lane 7", RUN_DEADLINE, || async {
        grid.nats.log_tail(10_000).contains("pool7-a").then_some(())
    });
    asked.await.or_logs(&grid)?;
    let started = std::time::Instant::now();
    let run = client.start(StartRun { flow: "echo-once".into(), input: json!("7"), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(4), "a default-lane task took {took:?}\n{}", grid.logs());
    Ok(())
}
