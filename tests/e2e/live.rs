//! Live output: what a worker emits while its attempt runs reaches `flowgrid run tail`,
//! `Client::tail` and the web UI, in order, while the run goes and after it ended.

use std::time::Duration;

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{header, http_exchange, http_get, http_post_json, wait_for, Grid};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// A second's wait, then a model's answer that comes word by word.
const ANSWER_FLOW: &str = r#"
name: answer
steps:
  - { id: think, kind: wait, duration_ms: 1000 }
  - { id: answer, kind: task, pool: gpu, task: generate, after: [think], input: '#{ prompt: input.prompt }' }
"#;

const REPLY: &str = "Generated reply to: what is a grid";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_live_output_reaches_whoever_tails_the_run() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["gpu"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ANSWER_FLOW).await?;
    let start = StartRun { flow: "answer".into(), input: json!({"prompt": "what is a grid"}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let run_id = run.run_id.to_string();

    // Tailed while the run waits: the words come as the worker emits them, then the command ends with the run.
    let (ok, text, errors) = grid.cli(&["run", "tail", &run_id])?;
    assert!(ok, "{text}{errors}\n{}", grid.logs());
    assert_eq!(text, format!("{REPLY}\n"));
    assert!(
        errors.contains("── answer, attempt 1 ──") && errors.contains(&format!("run {run_id} succeeded")),
        "{errors}"
    );

    // After the end the grid still has it all, in order, numbered.
    let (ok, text, errors) = grid.cli(&["--json", "run", "tail", &run_id, "--step", "answer"])?;
    assert!(ok, "{errors}");
    let pieces: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    assert_eq!(pieces.len(), words.len(), "{text}");
    for (index, (piece, word)) in pieces.iter().zip(&words).enumerate() {
        assert_eq!(piece, &json!({"step": "answer", "item": null, "attempt": 1, "seq": index + 1, "data": word}));
    }

    let mut tail = client.tail(&run.run_id, None).await?;
    let mut seen = String::new();
    for expected_seq in 1..=words.len() as u64 {
        let piece = tokio::time::timeout(RUN_DEADLINE, tail.next()).await?.expect("a piece")?;
        assert_eq!((piece.attempt.step.as_str(), piece.seq), ("answer", expected_seq));
        seen.push_str(piece.data.as_str().unwrap_or_default());
    }
    assert_eq!(seen, REPLY);
    assert_eq!(client.get(&run.run_id).await?.status, RunStatus::Succeeded);

    // The run's page in the web UI shows it too, by attempt.
    let addr = crate::ui::start_ui(&mut grid, &[]).await?;
    let (status, page) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h2>Live output</h2>") && page.contains(&format!("<pre>{REPLY}</pre>")), "{page}");

    // The timeout holds after the run's end too: output that keeps coming (here, published
    // by hand for 20 s) does not hold the tail past it.
    let nats = grid.nats_client().await?;
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).live(&run_id, "answer");
    let attempt =
        flowgrid_model::AttemptId { run_id: run.run_id.clone(), step: "answer".into(), item: None, attempt: 1 };
    let publisher = tokio::spawn(async move {
        for seq in 100..300 {
            let piece = flowgrid_proto::LiveOutput { attempt: attempt.clone(), seq, data: json!("more ") };
            let bytes = flowgrid_proto::encode(flowgrid_proto::Encoding::MsgPack, &piece).expect("encodes");
            let _ = nats.publish(subject.clone(), bytes.into()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = std::time::Instant::now();
    let (_, _, errors) = grid.cli(&["run", "tail", &run_id, "--timeout", "1s"])?;
    let took = started.elapsed();
    publisher.abort();
    assert!(took < Duration::from_secs(10), "the tail went on {took:?} past its 1 s timeout: {errors}");

    // A step the run does not have is named with the ones it has.
    let (ok, _, errors) = grid.cli(&["run", "tail", &run_id, "--step", "nope"])?;
    assert!(!ok && errors.contains("has no step \"nope\"; its steps: think, answer"), "{errors}");
    Ok(())
}

const API_TOKEN: &str = "a-token-of-32-characters-or-more";

/// The data of each event `name` of a server-sent event stream, in order.
fn events<'a>(stream: &'a str, name: &str) -> Vec<&'a str> {
    stream
        .split("\n\n")
        .filter(|event| event.lines().any(|line| line == format!("event: {name}")))
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_starts_signals_and_reads_runs_and_streams_live_output() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["gpu"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ANSWER_FLOW).await?;
    deploy(&grid, &client, "name: approval\noutput: steps.ok.output\nsteps:\n  - { id: ok, kind: signal }\n").await?;
    let addr = crate::ui::start_ui(&mut grid, &["--api-token", API_TOKEN]).await?;

    // Changes need the token, and a body the call takes.
    let start = r#"{"flow": "answer", "input": {"prompt": "hello api"}, "idempotency_key": "k-1"}"#;
    let (status, body) = http_post_json(&addr, "/api/runs", start, None)?;
    assert!(status == 401 && body.contains(r#""code":"unauthorized""#), "{status} {body}");
    let (status, body) = http_post_json(&addr, "/api/runs", start, Some("another-token-of-32-characters!!"))?;
    assert!(status == 401 && body.contains("not this API's"), "{status} {body}");
    let (status, body) = http_post_json(&addr, "/api/runs", r#"{"flow": "answer", "colour": 1}"#, Some(API_TOKEN))?;
    assert!(status == 400 && body.contains("unknown field `colour`"), "{status} {body}");
    let (status, body) = http_post_json(&addr, "/api/runs", r#"{"flow": "nope"}"#, Some(API_TOKEN))?;
    assert!(status == 404 && body.contains(r#""code":"not_found""#), "{status} {body}");

    let (status, body) = http_post_json(&addr, "/api/runs", start, Some(API_TOKEN))?;
    assert_eq!(status, 201, "{body}");
    let started: Value = serde_json::from_str(&body)?;
    let run_id = started["run_id"].as_str().expect("a run id").to_owned();
    let (status, again) = http_post_json(&addr, "/api/runs", start, Some(API_TOKEN))?;
    assert!(status == 200 && again.contains(r#""created":false"#), "the same key names the same run: {again}");
    // A wrong method or path, and a body past the server's bound, are JSON refusals too.
    let json_refusal = |status: u16, body: &str, code: &str| {
        let refusal: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!((status, refusal["error"]["code"].as_str()), (status, Some(code)), "{body}");
    };
    let (status, _, body) = http_exchange(&addr, "PUT", "/api/runs", &[], None)?;
    assert_eq!(status, 405);
    json_refusal(status, &body, "method_not_allowed");
    let (status, _, body) = http_exchange(&addr, "GET", "/api/nosuch", &[], None)?;
    assert_eq!(status, 404);
    json_refusal(status, &body, "not_found");
    // Under a run, a change asked for the wrong way, and a path that is no call.
    let (status, _, body) = http_exchange(&addr, "GET", &format!("/api/runs/{run_id}/cancel"), &[], None)?;
    assert_eq!(status, 405);
    json_refusal(status, &body, "method_not_allowed");
    let (status, _, body) = http_exchange(&addr, "GET", &format!("/api/runs/{run_id}/nosuch"), &[], None)?;
    assert_eq!(status, 404);
    json_refusal(status, &body, "not_found");
    let huge = format!(r#"{{"flow": "answer", "input": "{}"}}"#, "y".repeat(7 << 20));
    let (status, body) = http_post_json(&addr, "/api/runs", &huge, Some(API_TOKEN))?;
    assert_eq!(status, 413);
    json_refusal(status, &body, "payload_too_large");
    let bearer = format!("Bearer {API_TOKEN}");
    let lower_case = format!("bearer {API_TOKEN}");
    let headers = [("Content-Type", "application/json"), ("Authorization", lower_case.as_str())];
    let (status, _, body) = http_exchange(&addr, "POST", "/api/runs", &headers, Some(start))?;
    assert_eq!(status, 200, "the scheme's name in any case: {body}");

    // Followed while the run waits: every piece as an event, then its end.
    let (status, stream) = http_get(&addr, &format!("/api/runs/{run_id}/live"))?;
    assert_eq!(status, 200, "{stream}");
    let said: String = events(&stream, "piece")
        .iter()
        .map(|data| serde_json::from_str::<Value>(data).map(|piece| piece["data"].as_str().unwrap_or("").to_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(said, "Generated reply to: hello api", "{stream}");
    assert_eq!(events(&stream, "end"), vec![r#"{"status":"succeeded"}"#], "{stream}");
    // A long answer already kept (more pieces than the server buffers for one reader)
    // comes whole to a reader that asks after the end.
    let prompt = vec!["word"; 600].join(" ");
    let long = StartRun { flow: "answer".into(), input: json!({"prompt": prompt}), ..Default::default() };
    let long = client.start(long).await.or_logs(&grid)?;
    grid.wait_run(&client, &long.run_id, RUN_DEADLINE).await?;
    let (_, stream) = http_get(&addr, &format!("/api/runs/{}/live", long.run_id))?;
    assert_eq!(events(&stream, "piece").len(), 603, "the reply's 603 words");
    assert_eq!(events(&stream, "end"), vec![r#"{"status":"succeeded"}"#]);

    let (status, body) = http_get(&addr, &format!("/api/runs/{run_id}"))?;
    let view: Value = serde_json::from_str(&body)?;
    assert_eq!((status, view["status"].as_str()), (200, Some("succeeded")), "{body}");
    let (status, body) = http_get(&addr, "/api/runs/no-such-run")?;
    assert!(status == 404 && body.contains(r#""code":"not_found""#), "{status} {body}");
    // A path that is not UTF-8 once decoded gets the API's JSON refusal too.
    let (status, body) = http_get(&addr, "/api/runs/%ff%fe")?;
    assert!(status == 400 && body.contains(r#""code":"invalid_request""#), "{status} {body}");
    // Flows a page at a time.
    let (status, body) = http_get(&addr, "/api/flows?limit=1")?;
    let page: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status, &page["flows"][0]["name"], &page["next_cursor"]),
        (200, &json!("answer"), &json!("answer")),
        "{body}"
    );
    let (_, body) = http_get(&addr, "/api/flows?cursor=answer")?;
    let page: Value = serde_json::from_str(&body)?;
    assert_eq!((&page["flows"][0]["name"], page.get("next_cursor")), (&json!("approval"), None), "{body}");
    let (status, body) = http_get(&addr, "/api/flows?limit=many")?;
    assert!(status == 400 && body.contains("limit=many: not a whole number"), "{status} {body}");

    // A signal sent over HTTP ends a run that waits for it.
    let (_, body) = http_post_json(&addr, "/api/runs", r#"{"flow": "approval"}"#, Some(API_TOKEN))?;
    let waiting: Value = serde_json::from_str(&body)?;
    let waiting = flowgrid_sdk::RunId(waiting["run_id"].as_str().expect("a run id").into());
    wait_for("the signal step to wait", RUN_DEADLINE, || async {
        let view = client.get(&waiting).await.ok()?;
        (flowgrid_tests::step(&view, "ok").status == flowgrid_sdk::StepStatus::Running).then_some(())
    })
    .await?;
    let path = format!("/api/runs/{waiting}/signals/ok");
    let keyed = [("Content-Type", "application/json"), ("Authorization", &bearer), ("Idempotency-Key", "clé-1")];
    let (status, _, body) = http_exchange(&addr, "POST", &path, &keyed, Some(r#"{"by": "http"}"#))?;
    assert!(status == 200 && body.contains(r#""applied":true"#), "{status} {body}");
    // Sent again under its key (its answer lost), it is still the signal the step took.
    let (status, _, body) = http_exchange(&addr, "POST", &path, &keyed, Some(r#"{"by": "http"}"#))?;
    assert!(status == 200 && body.contains(r#""applied":true"#), "{status} {body}");
    let (status, body) = http_post_json(&addr, &path, r#"{"by": "other"}"#, Some(API_TOKEN))?;
    assert!(status == 200 && body.contains(r#""applied":false"#), "{status} {body}");
    for (first, second) in [("  ", None), ("a", Some("b"))] {
        let mut headers = vec![("Content-Type", "application/json"), ("Authorization", bearer.as_str())];
        headers.push(("Idempotency-Key", first));
        headers.extend(second.map(|second| ("Idempotency-Key", second)));
        let (status, _, body) = http_exchange(&addr, "POST", &path, &headers, Some("1"))?;
        assert!(status == 400 && body.contains("Idempotency-Key"), "{status} {body}");
    }
    let view = grid.wait_run(&client, &waiting, RUN_DEADLINE).await?;
    assert_eq!(view.output, Some(json!({"by": "http"})));

    // Pause, resume, cancel and redrive over HTTP; runs listed by flow and label, a run's
    // history, the flows.
    let labelled = r#"{"flow": "approval", "labels": {"team": "http"}}"#;
    let (_, body) = http_post_json(&addr, "/api/runs", labelled, Some(API_TOKEN))?;
    let held: Value = serde_json::from_str(&body)?;
    let held = held["run_id"].as_str().expect("a run id").to_owned();
    for (change, body, answer) in [
        ("pause", r#"{"reason": "held"}"#, r#""paused":true,"applied":true"#),
        ("pause", "", r#""applied":false"#),
        ("resume", "", r#""paused":false,"applied":true"#),
        ("cancel", r#"{"reason": "not now"}"#, r#""status":"cancelled","applied":true"#),
        ("redrive", r#"{"reason": "now"}"#, r#""status":"running","times":1"#),
    ] {
        let (status, reply) = http_post_json(&addr, &format!("/api/runs/{held}/{change}"), body, Some(API_TOKEN))?;
        assert!(status == 200 && reply.contains(answer), "{change}: {status} {reply}");
    }
    let (status, reply) =
        http_post_json(&addr, &format!("/api/runs/{held}/pause"), r#"{"from": ["ok"]}"#, Some(API_TOKEN))?;
    assert!(status == 400 && reply.contains("`from` is taken by a redrive only"), "{status} {reply}");
    let (status, reply) = http_post_json(&addr, &format!("/api/runs/{held}/redrive"), "", Some(API_TOKEN))?;
    assert!(status == 409 && reply.contains(r#""code":"conflict""#), "a running run: {status} {reply}");
    let (status, body) = http_get(&addr, "/api/runs?flow=approval&label=team=http")?;
    let listed: Value = serde_json::from_str(&body)?;
    assert_eq!((status, listed["runs"].as_array().map(Vec::len)), (200, Some(1)), "{body}");
    assert_eq!(listed["runs"][0]["run_id"].as_str(), Some(held.as_str()), "{body}");
    let (status, body) = http_get(&addr, "/api/runs?flow=approval&limt=1")?;
    assert!(status == 400 && body.contains("unknown field `limt`"), "{status} {body}");
    let (status, body) = http_get(&addr, "/api/runs?flow=approval&flow=answer")?;
    assert!(status == 400 && body.contains("flow is given twice"), "{status} {body}");
    let (status, body) = http_get(&addr, "/api/runs?label=team=http&label=team=ops")?;
    assert!(status == 400 && body.contains("label team is given twice"), "{status} {body}");
    let (status, body) = http_get(&addr, "/api/runs?limit=99999999999999999999")?;
    assert!(status == 400 && body.contains("too large"), "{status} {body}");
    let (status, body) = http_get(&addr, &format!("/api/runs/{held}?x=1"))?;
    assert!(status == 400 && body.contains("takes no query parameters"), "{status} {body}");
    let (status, body) = http_get(&addr, "/api/flows?x=1")?;
    assert!(status == 400 && body.contains("unknown field `x`, expected `limit` or `cursor`"), "{status} {body}");
    let (status, body) = http_get(&addr, &format!("/api/runs/{held}/history?limit=2"))?;
    let page: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status, page["records"].as_array().map(Vec::len), page["next"].as_u64()),
        (200, Some(2), Some(1)),
        "{body}"
    );
    let (_, body) = http_get(&addr, &format!("/api/runs/{held}/history?after=0"))?;
    assert!(body.contains(r#""type":"pause_requested","reason":"held""#), "{body}");
    assert!(body.contains(r#""type":"resume_requested","reason":"resumed through the HTTP API""#), "{body}");
    let (status, body) = http_get(&addr, "/api/flows")?;
    assert!(status == 200 && body.contains(r#""name":"approval""#) && body.contains(r#""name":"answer""#), "{body}");
    let (status, body) = http_get(&addr, "/api/flows/approval?version=1")?;
    assert!(status == 200 && body.contains(r#""kind":"signal""#), "{status} {body}");
    let (status, body) = http_get(&addr, "/api/flows/nope")?;
    assert!(status == 404 && body.contains(r#""code":"not_found""#), "{status} {body}");

    // Without a token the API only reads; a short token is refused at start.
    let read_only = crate::ui::start_ui(&mut grid, &[]).await?;
    let (status, body) = http_post_json(&read_only, "/api/runs", start, Some(API_TOKEN))?;
    assert!(status == 403 && body.contains("read-only"), "{status} {body}");
    let (ok, _, errors) = grid.cli(&["ui", "--api-token", "short"])?;
    assert!(!ok && errors.contains("--api-token has 5 characters; use at least 16"), "{errors}");

    // Pages of an origin named with --api-cors-origin may call the API from a browser;
    // others, and the UI's own pages, get no CORS answer.
    let app = "https://app.example.com";
    let cors = crate::ui::start_ui(&mut grid, &["--api-token", API_TOKEN, "--api-cors-origin", app]).await?;
    let preflight = [
        ("Origin", app),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization,content-type"),
    ];
    let (status, headers, _) = http_exchange(&cors, "OPTIONS", "/api/runs", &preflight, None)?;
    assert_eq!((status, header(&headers, "access-control-allow-origin")), (200, Some(app)), "{headers:?}");
    assert!(header(&headers, "access-control-allow-methods").is_some_and(|methods| methods.contains("POST")));
    assert!(header(&headers, "access-control-allow-headers").is_some_and(|names| names.contains("authorization")));
    let (status, headers, _) = http_exchange(&cors, "GET", &format!("/api/runs/{run_id}"), &[("Origin", app)], None)?;
    assert_eq!((status, header(&headers, "access-control-allow-origin")), (200, Some(app)), "{headers:?}");
    let other = [("Origin", "https://elsewhere.example.com")];
    let (status, headers, _) = http_exchange(&cors, "GET", &format!("/api/runs/{run_id}"), &other, None)?;
    assert_eq!((status, header(&headers, "access-control-allow-origin")), (200, None), "{headers:?}");
    let (status, headers, _) = http_exchange(&cors, "GET", "/", &[("Origin", app)], None)?;
    assert_eq!((status, header(&headers, "access-control-allow-origin")), (200, None), "{headers:?}");
    let (ok, _, errors) = grid.cli(&["ui", "--api-cors-origin", "app.example.com"])?;
    assert!(!ok && errors.contains("\"app.example.com\" is not an origin"), "{errors}");
    // No other site may frame the pages.
    let (_, headers, _) = http_exchange(&cors, "GET", "/", &[], None)?;
    assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{headers:?}");
    assert_eq!(header(&headers, "content-security-policy"), Some("frame-ancestors 'none'"), "{headers:?}");

    // On loopback, a request for another name (a site pointed at 127.0.0.1) is refused.
    let mut stream = std::net::TcpStream::connect(&cors)?;
    std::io::Write::write_all(&mut stream, b"GET / HTTP/1.0\r\nHost: evil.example\r\n\r\n")?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    assert!(answer.starts_with("HTTP/1.0 403") && answer.contains("loopback"), "{answer}");

    // SIGTERM stops the UI at once even while a live stream follows a run that goes on.
    let (_, body) = http_post_json(&cors, "/api/runs", r#"{"flow": "approval"}"#, Some(API_TOKEN))?;
    let going: Value = serde_json::from_str(&body)?;
    let mut stream = std::net::TcpStream::connect(&cors)?;
    let request =
        format!("GET /api/runs/{}/live HTTP/1.1\r\nHost: {cors}\r\n\r\n", going["run_id"].as_str().unwrap_or(""));
    std::io::Write::write_all(&mut stream, request.as_bytes())?;
    let mut first = [0u8; 64];
    let read = std::io::Read::read(&mut stream, &mut first)?;
    assert!(first[..read].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..read]));
    let ui = grid.workers.last_mut().expect("the last UI started");
    assert!(ui.stop(Duration::from_secs(8)), "the UI did not stop by itself within 8 s\n{}", grid.logs());
    Ok(())
}
