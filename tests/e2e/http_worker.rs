//! `flowgrid http-worker`: task steps that call an HTTP service, answered by a small
//! server in the test. Only URLs under `--allow` are called, redirects included, and a
//! redirect only within its origin, five at most; 5xx is retried, 4xx is final, whatever the
//! size of the error page; a body past `--response-max-kb`, one that is not text, or an
//! output over a result's limit fails the attempt with a code of its own, and so does a
//! 2xx answer whose body breaks off, which is not sent again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;
use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{flowgrid_bin, free_port, python_bin, Grid};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

const CALL_FLOW: &str = r#"
name: call
output: 'steps.fetch.output'
steps:
  - id: fetch
    kind: task
    pool: http
    task: request
    input: 'input'
    timeout_ms: 10000
    retry: { max_attempts: 3, initial_backoff_ms: 50, retry_on: [unavailable, http_503] }
"#;

/// Requests the server answered, by route.
#[derive(Default)]
struct Hits {
    echo: AtomicU64,
    flaky: AtomicU64,
    outside: AtomicU64,
}

/// The service: echoes a POST, fails once then succeeds, says 404, redirects outside the
/// allowed prefix, sends 100 KiB.
async fn serve(hits: Arc<Hits>, port: u16) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/v1/echo",
            post(|State(hits): State<Arc<Hits>>, headers: HeaderMap, body: String| async move {
                hits.echo.fetch_add(1, Ordering::SeqCst);
                let key = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).unwrap_or("");
                let got: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let reply = json!({ "got": got, "idempotency_key": key, "content_type": headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) });
                ([(header::CONTENT_TYPE, "application/json")], reply.to_string())
            }),
        )
        .route(
            "/v1/flaky",
            get(|State(hits): State<Arc<Hits>>| async move {
                match hits.flaky.fetch_add(1, Ordering::SeqCst) {
                    0 => (StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response(),
                    _ => "ready".into_response(),
                }
            }),
        )
        .route("/v1/missing", get(|| async { (StatusCode::NOT_FOUND, "no such order") }))
        .route("/v1/away", get(|| async { Redirect::temporary("/v2/secret") }))
        .route(
            "/v2/secret",
            get(|State(hits): State<Arc<Hits>>| async move {
                hits.outside.fetch_add(1, Ordering::SeqCst);
                "secret"
            }),
        )
        .route("/v1/big", get(|| async { "x".repeat(100 * 1024) }))
        .route(
            "/v1/cookies",
            get(|| async {
                let cookies = [(header::SET_COOKIE, "a=1"), (header::SET_COOKIE, "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT")];
                (axum::response::AppendHeaders(cookies), "ok")
            }),
        )
        .with_state(hits);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// An HTTPS server on 127.0.0.1:argv[1] with the certificate and key in argv[2],
/// answering every GET with `{"secure": true}`.
const HTTPS_SERVER: &str = r#"
import http.server, os, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "16")
        self.end_headers()
        self.wfile.write(b'{"secure": true}')
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(os.path.join(sys.argv[2], "server.pem"), os.path.join(sys.argv[2], "server-key.pem"))
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

async fn call(grid: &Grid, client: &flowgrid_sdk::Client, input: Value) -> anyhow::Result<flowgrid_sdk::RunView> {
    let run = client.start(StartRun { flow: "call".into(), input, ..Default::default() }).await.or_logs(grid)?;
    grid.wait_run(client, &run.run_id, RUN_DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_steps_call_http_services_under_the_allowed_prefixes_only() -> anyhow::Result<()> {
    let port = free_port()?;
    let hits = Arc::new(Hits::default());
    tokio::spawn(serve(Arc::clone(&hits), port));
    let base = format!("http://127.0.0.1:{port}");
    let mut grid = Grid::start_nats()?;
    grid.start_coordinator().await?;
    // An HTTPS service whose certificate a private authority signed.
    let ca = crate::secured::write_certificates(grid.dir.path())?;
    let tls_port = free_port()?;
    let mut https = std::process::Command::new(python_bin());
    https.args(["-c", HTTPS_SERVER, &tls_port.to_string()]).arg(grid.dir.path());
    grid.spawn_worker("https-service", &mut https)?;
    let mut worker = std::process::Command::new(flowgrid_bin());
    worker.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("{base}/v1/")]);
    worker.args(["--allow", &format!("https://127.0.0.1:{tls_port}/")]).arg("--ca-file").arg(&ca);
    worker.args(["--response-max-kb", "64", "--timeout-ms", "5000"]);
    grid.spawn_worker("http-worker", &mut worker)?;
    let client = grid.client().await?;
    deploy(&grid, &client, CALL_FLOW).await?;

    // A POST with a JSON body: the response's JSON body, status and headers.
    let view =
        call(&grid, &client, json!({"url": format!("{base}/v1/echo"), "method": "post", "body": {"n": 7}})).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let output = view.output.clone().unwrap_or_default();
    assert_eq!(output["status"], json!(200), "{output}");
    assert_eq!(output["body"]["got"], json!({"n": 7}), "{output}");
    assert_eq!(output["body"]["content_type"], json!("application/json"), "a JSON body is sent as JSON: {output}");
    assert_eq!(output["headers"]["content-type"], json!("application/json"), "{output}");
    let key = output["body"]["idempotency_key"].as_str().unwrap_or_default();
    assert!(key.starts_with(view.run_id.as_str()), "the idempotency key names the attempt: {key}");
    // A header sent twice is a list of both values (before, the last one alone).
    let view = call(&grid, &client, json!({"url": format!("{base}/v1/cookies")})).await?;
    let output = view.output.clone().unwrap_or_default();
    let cookies = json!(["a=1", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]);
    assert_eq!(output["headers"]["set-cookie"], cookies, "{output}");

    // HTTPS, trusted through --ca-file (once the service listens).
    flowgrid_tests::wait_for("the HTTPS service to listen", RUN_DEADLINE, || async {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok()
    })
    .await?;
    let view = call(&grid, &client, json!({"url": format!("https://127.0.0.1:{tls_port}/status")})).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output.map(|output| output["body"].clone()), Some(json!({"secure": true})));

    // 503 then 200: retried, a text body.
    let view = call(&grid, &client, json!({"url": format!("{base}/v1/flaky")})).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert_eq!(view.output.as_ref().map(|output| output["body"].clone()), Some(json!("ready")));
    assert_eq!(view.steps[0].attempts, 2, "{view:?}");

    // 404: final, with the body's start in the message.
    let view = call(&grid, &client, json!({"url": format!("{base}/v1/missing")})).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}");
    let error = view.error.clone().expect("a failed run has an error");
    assert_eq!(error.code, "http_404", "{error:?}");
    assert!(error.message.contains("no such order"), "{error:?}");
    assert_eq!(view.steps[0].attempts, 1, "a 404 is not retried: {view:?}");

    // Outside the prefix, directly or by a redirect: never called.
    for path in ["/v2/secret", "/v1/away"] {
        let view = call(&grid, &client, json!({"url": format!("{base}{path}")})).await?;
        let error = view.error.clone().expect("refused");
        assert_eq!((view.status, error.code.as_str()), (RunStatus::Failed, "forbidden_url"), "{path}: {error:?}");
    }
    assert_eq!(hits.outside.load(Ordering::SeqCst), 0, "a URL outside --allow was called");

    // Too large a body, a bad input.
    let view = call(&grid, &client, json!({"url": format!("{base}/v1/big")})).await?;
    assert_eq!(view.error.map(|error| error.code), Some("payload_too_large".to_owned()));
    let view = call(&grid, &client, json!({"url": format!("{base}/v1/echo"), "verb": "GET"})).await?;
    let error = view.error.expect("refused");
    assert!(error.code == "invalid_input" && error.message.contains("verb"), "{error:?}");
    let bad_header = json!({"url": format!("{base}/v1/echo"), "headers": {"bad header": "x"}});
    let view = call(&grid, &client, bad_header).await?;
    let error = view.error.expect("refused");
    assert_eq!((error.code.as_str(), view.steps[0].attempts), ("invalid_input", 1), "{error:?}");
    // A Host header would reach another site behind the allowed address and port.
    let other_site = json!({"url": format!("{base}/v1/echo"), "headers": {"host": "admin.internal"}});
    let view = call(&grid, &client, other_site).await?;
    let error = view.error.expect("refused");
    assert!(error.code == "invalid_input" && error.message.contains("\"host\" is the worker's to set"), "{error:?}");
    assert_eq!(hits.echo.load(Ordering::SeqCst), 1, "{:?}", hits.echo);

    // The worker refuses to start without --allow or with a prefix that is no http URL.
    for args in [&["http-worker"][..], &["http-worker", "--allow", "ftp://files.example.com/"]] {
        let output = std::process::Command::new(flowgrid_bin()).args(args).output()?;
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && text.contains("--allow"), "{args:?}: {text}");
    }
    Ok(())
}

const PACED_FLOW: &str = r#"
name: paced
steps:
  - id: calls
    kind: map
    items: 'input.urls'
    pool: http
    task: request
    input: '#{ url: item }'
    timeout_ms: 10000
"#;

fn times_len(times: &std::sync::Mutex<Vec<std::time::Instant>>) -> usize {
    times.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_worker_paces_its_requests_and_stops_within_its_grace() -> anyhow::Result<()> {
    let port = free_port()?;
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = Router::new()
        .route(
            "/tick",
            get(|State(times): State<Arc<std::sync::Mutex<Vec<std::time::Instant>>>>| async move {
                times.lock().unwrap().push(std::time::Instant::now());
                "tick"
            }),
        )
        .route(
            "/slow",
            get(|State(times): State<Arc<std::sync::Mutex<Vec<std::time::Instant>>>>| async move {
                times.lock().unwrap().push(std::time::Instant::now());
                tokio::time::sleep(std::time::Duration::from_secs(20)).await;
                "slow"
            }),
        )
        .with_state(Arc::clone(&times));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut grid = Grid::start_nats()?;
    grid.start_coordinator().await?;
    let mut worker = std::process::Command::new(flowgrid_bin());
    worker.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("http://127.0.0.1:{port}/")]);
    worker.args(["--max-rate", "10", "--concurrency", "64"]);
    grid.spawn_worker("http-worker", &mut worker)?;
    let client = grid.client().await?;
    deploy(&grid, &client, PACED_FLOW).await?;

    let urls: Vec<String> = (0..6).map(|_| format!("http://127.0.0.1:{port}/tick")).collect();
    let run =
        client.start(StartRun { flow: "paced".into(), input: json!({"urls": urls}), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let ticks = times.lock().unwrap().clone();
    assert_eq!(ticks.len(), 6);
    // Six requests at 10 a second: the last at least 5 intervals after the first.
    let spread = ticks[5].duration_since(ticks[0]);
    assert!(spread >= std::time::Duration::from_millis(450), "six requests within {spread:?}");

    // A worker at one request every 10 s takes a task at most a second before its turn: the
    // other five wait in the stream for other workers (before, it took them all, and their
    // turns went up to 50 s on, past their deadlines). It stops at once, and the next
    // worker runs them.
    assert!(grid.workers.pop().expect("the first worker").stop(RUN_DEADLINE), "{}", grid.logs());
    let mut slow = std::process::Command::new(flowgrid_bin());
    slow.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("http://127.0.0.1:{port}/")]);
    slow.args(["--max-rate", "0.1", "--concurrency", "64"]);
    grid.spawn_worker("slow-http-worker", &mut slow)?;
    let run =
        client.start(StartRun { flow: "paced".into(), input: json!({"urls": urls}), ..Default::default() }).await?;
    let first = flowgrid_tests::wait_for("the slow worker's first request", RUN_DEADLINE, || async {
        (times_len(&times) > 6).then_some(())
    });
    first.await.or_logs(&grid)?;
    // Nothing else is out with it; five wait in the stream.
    let stream = async_nats::jetstream::new(grid.nats_client().await?).get_stream("FLOWGRID_TASKS").await?;
    let consumer = flowgrid_proto::Subjects::new(grid.prefix.clone()).pool_consumer("http");
    let left = flowgrid_tests::wait_for("five tasks left in the stream", RUN_DEADLINE, || async {
        let info = stream.consumer_info(&consumer).await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 5).then_some(())
    });
    left.await.or_logs(&grid)?;
    // And it stays so for the next seconds: the worker takes none of them before then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let info = stream.consumer_info(&consumer).await?;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 5), "{info:?}\n{}", grid.logs());
    let stopping = std::time::Instant::now();
    assert!(grid.workers.pop().expect("the slow worker").stop(RUN_DEADLINE), "{}", grid.logs());
    let stopped_in = stopping.elapsed();
    assert!(stopped_in < std::time::Duration::from_secs(10), "the stop waited {stopped_in:?} for tasks not started");
    let mut fast = std::process::Command::new(flowgrid_bin());
    fast.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("http://127.0.0.1:{port}/")]);
    grid.spawn_worker("fast-http-worker", &mut fast)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());

    // With --shutdown-grace-ms 300, a stop abandons a request that takes 20 s after 0.3 s.
    assert!(grid.workers.pop().expect("the fast worker").stop(RUN_DEADLINE), "{}", grid.logs());
    let mut brief = std::process::Command::new(flowgrid_bin());
    brief.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("http://127.0.0.1:{port}/")]);
    brief.args(["--shutdown-grace-ms", "300"]);
    grid.spawn_worker("brief-http-worker", &mut brief)?;
    let before = times_len(&times);
    let slow = vec![format!("http://127.0.0.1:{port}/slow")];
    client.start(StartRun { flow: "paced".into(), input: json!({"urls": slow}), ..Default::default() }).await?;
    let called = flowgrid_tests::wait_for("the slow request", RUN_DEADLINE, || async {
        (times_len(&times) > before).then_some(())
    });
    called.await.or_logs(&grid)?;
    let stopping = std::time::Instant::now();
    grid.workers.pop().expect("the brief worker").stop(RUN_DEADLINE);
    let stopped_in = stopping.elapsed();
    assert!(stopped_in < std::time::Duration::from_secs(10), "the stop waited {stopped_in:?} for a 20 s request");
    // It went back at once (naked): another worker has it well before the 30 s ack wait,
    // and before the attempt's 10 s timeout would retry it.
    let mut again = std::process::Command::new(flowgrid_bin());
    again.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", &format!("http://127.0.0.1:{port}/")]);
    grid.spawn_worker("next-http-worker", &mut again)?;
    let handed_back = std::time::Duration::from_secs(5);
    let delivered = flowgrid_tests::wait_for("the abandoned task delivered again", handed_back, || async {
        (times_len(&times) > before + 1).then_some(())
    });
    delivered.await.or_logs(&grid)?;

    let output = std::process::Command::new(flowgrid_bin())
        .args(["http-worker", "--allow", "http://127.0.0.1:1/", "--max-rate", "0"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("--max-rate"), "{text}");
    Ok(())
}

/// Serves `app` on a free port of 127.0.0.1 until the test ends; the port.
async fn listen(app: Router) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

/// A grid with the flow `call` and an HTTP worker allowed `/v1/` of each of `ports`, with
/// the flags `more`.
async fn http_grid(ports: &[u16], more: &[&str]) -> anyhow::Result<(Grid, flowgrid_sdk::Client)> {
    let mut grid = Grid::start_nats()?;
    grid.start_coordinator().await?;
    let mut worker = std::process::Command::new(flowgrid_bin());
    worker.args(["--nats-url", &grid.nats_url, "http-worker"]).args(more);
    for port in ports {
        worker.args(["--allow", &format!("http://127.0.0.1:{port}/v1/")]);
    }
    grid.spawn_worker("http-worker", &mut worker)?;
    let client = grid.client().await?;
    deploy(&grid, &client, CALL_FLOW).await?;
    Ok((grid, client))
}

/// A JSON response of the request's headers, lowercase names.
fn headers_json(headers: &HeaderMap) -> impl IntoResponse {
    let pairs = headers.iter().map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap_or("?"))));
    ([(header::CONTENT_TYPE, "application/json")], Value::Object(pairs.collect()).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_status_keeps_its_code_and_retry_whatever_the_size_of_its_body() -> anyhow::Result<()> {
    // Error pages past --response-max-kb 64 (before, read whole first: `payload_too_large`,
    // final, so a 503 was not retried and a step's catch of `http_404` never matched).
    let busy = Arc::new(AtomicU64::new(0));
    let page = |title: &str| format!("<html><title>{title}</title>{}</html>", "x".repeat(100 * 1024));
    let (unavailable, missing) = (page("Service Unavailable"), page("No such order"));
    let html = || [(header::CONTENT_TYPE, "text/html")];
    let app = Router::new()
        .route(
            "/v1/busy",
            get(move |State(busy): State<Arc<AtomicU64>>| async move {
                busy.fetch_add(1, Ordering::SeqCst);
                (StatusCode::SERVICE_UNAVAILABLE, html(), unavailable)
            }),
        )
        .route("/v1/gone", get(move || async move { (StatusCode::NOT_FOUND, html(), missing) }))
        .with_state(Arc::clone(&busy));
    let port = listen(app).await?;
    let (grid, client) = http_grid(&[port], &["--response-max-kb", "64"]).await?;

    let view = call(&grid, &client, json!({"url": format!("http://127.0.0.1:{port}/v1/busy")})).await?;
    let error = view.error.clone().expect("a failed run has an error");
    assert_eq!((view.status, error.code.as_str()), (RunStatus::Failed, "http_503"), "{error:?}");
    assert_eq!((view.steps[0].attempts, busy.load(Ordering::SeqCst)), (3, 3), "a 503 is retried: {view:?}");
    assert!(error.message.contains("<title>Service Unavailable</title>"), "{error:?}");
    assert!(error.message.len() < 1000, "the message quotes the body's start only: {} bytes", error.message.len());

    let view = call(&grid, &client, json!({"url": format!("http://127.0.0.1:{port}/v1/gone")})).await?;
    let error = view.error.clone().expect("a failed run has an error");
    assert_eq!((error.code.as_str(), view.steps[0].attempts), ("http_404", 1), "{error:?}");
    assert!(error.message.contains("No such order"), "{error:?}");
    Ok(())
}

/// A service on a free port of 127.0.0.1 that answers each request `200 OK` with a
/// `Content-Length` of 1000, then closes the connection after the body's first 12 bytes;
/// it counts the requests in `hits`.
async fn cut_off_service(hits: Arc<AtomicU64>) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = listener.accept().await {
            let hits = Arc::clone(&hits);
            tokio::spawn(async move {
                let (mut request, mut buffer) = (Vec::new(), [0; 4096]);
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match connection.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
                let _ = connection.write_all(format!("{head}{{\"charged\": ").as_bytes()).await;
                let _ = connection.shutdown().await;
            });
        }
    });
    Ok(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_off_after_a_2xx_answer_is_not_sent_again() -> anyhow::Result<()> {
    // 200 and the body's first chunk, then nothing more (past the task's timeout_ms), or the
    // connection closed mid-body: the service may have applied the request.
    let hits = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/v1/stall",
            post(move |State(hits): State<Arc<AtomicU64>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let chunk = Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"charged\": "));
                let body = futures::stream::iter([chunk]).chain(futures::stream::pending());
                ([(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(body))
            }),
        )
        .with_state(Arc::clone(&hits));
    let port = listen(app).await?;
    let cut_port = cut_off_service(Arc::clone(&hits)).await?;
    let (grid, client) = http_grid(&[port, cut_port], &[]).await?;

    // The step retries `unavailable`: before, each break sent the request again, three times
    // in all, under a new Idempotency-Key each time.
    let urls = [format!("http://127.0.0.1:{port}/v1/stall"), format!("http://127.0.0.1:{cut_port}/v1/cut")];
    for url in urls {
        let before = hits.load(Ordering::SeqCst);
        let view = call(&grid, &client, json!({"url": url, "method": "POST", "timeout_ms": 500})).await?;
        let error = view.error.clone().expect("a failed run has an error");
        assert_eq!((error.code.as_str(), view.steps[0].attempts), ("response_incomplete", 1), "{url}: {error:?}");
        assert!(
            error.message.contains("answered 200 OK but its body broke off after")
                && error.message.contains("the request may have been applied"),
            "{url}: {error:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst) - before, 1, "{url}: the service was called again");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_worker_follows_five_redirects_and_no_more() -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/v1/hops/{left}",
            get(|axum::extract::Path(left): axum::extract::Path<u32>| async move {
                match left {
                    0 => "arrived".into_response(),
                    _ => Redirect::temporary(&format!("/v1/hops/{}", left - 1)).into_response(),
                }
            }),
        )
        .route("/v1/loop", get(|| async { Redirect::temporary("/v1/loop") }));
    let port = listen(app).await?;
    let (grid, client) = http_grid(&[port], &[]).await?;

    // Five redirects, as documented (before, the fifth was refused, as `forbidden_url`).
    let view = call(&grid, &client, json!({"url": format!("http://127.0.0.1:{port}/v1/hops/5")})).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output.map(|output| output["body"].clone()), Some(json!("arrived")));
    // A sixth, or a loop: a code of their own, final; `forbidden_url` says a URL is outside --allow.
    for path in ["/v1/hops/6", "/v1/loop"] {
        let view = call(&grid, &client, json!({"url": format!("http://127.0.0.1:{port}{path}")})).await?;
        let error = view.error.clone().expect("refused");
        assert_eq!((error.code.as_str(), view.steps[0].attempts), ("too_many_redirects", 1), "{path}: {error:?}");
        assert!(error.message.contains("more than 5 redirects"), "{path}: {error:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_stays_on_its_origin_and_sends_no_referer() -> anyhow::Result<()> {
    // Another service, also allowed: it should never see the flow's headers.
    let other_hits = Arc::new(AtomicU64::new(0));
    let other = Router::new()
        .route(
            "/v1/headers",
            get(|State(hits): State<Arc<AtomicU64>>, headers: HeaderMap| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                headers_json(&headers)
            }),
        )
        .with_state(Arc::clone(&other_hits));
    let other_port = listen(other).await?;
    let elsewhere = format!("http://127.0.0.1:{other_port}/v1/headers");
    let app = Router::new()
        .route("/v1/hop", get(|| async { Redirect::temporary("/v1/headers") }))
        .route("/v1/elsewhere", get(move || async move { Redirect::temporary(&elsewhere) }))
        .route("/v1/headers", get(|headers: HeaderMap| async move { headers_json(&headers) }));
    let port = listen(app).await?;
    let (grid, client) = http_grid(&[port, other_port], &[]).await?;
    let key = json!({"X-Api-Key": "k-123"});

    // On the same origin: the flow's headers, and no Referer (before, the previous URL with
    // its query: the token).
    let input = json!({"url": format!("http://127.0.0.1:{port}/v1/hop?token=s3cret"), "headers": key});
    let view = call(&grid, &client, input).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let got = view.output.map(|output| output["body"].clone()).unwrap_or_default();
    assert_eq!((got["x-api-key"].as_str(), got.get("referer")), (Some("k-123"), None), "{got}");

    // To another origin, though allowed: refused, naming the target (before, followed with
    // the flow's X-Api-Key and a Referer).
    let input = json!({"url": format!("http://127.0.0.1:{port}/v1/elsewhere?token=s3cret"), "headers": key});
    let view = call(&grid, &client, input).await?;
    let error = view.error.clone().expect("refused");
    assert_eq!((error.code.as_str(), view.steps[0].attempts), ("cross_origin_redirect", 1), "{error:?}");
    assert!(error.message.contains(&format!("127.0.0.1:{other_port}/v1/headers")), "{error:?}");
    assert_eq!(other_hits.load(Ordering::SeqCst), 0, "the other origin was called");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_or_oversized_response_fails_with_a_message_naming_its_url() -> anyhow::Result<()> {
    let png: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0xff, 0xfe];
    // 800 KB of JSON numbers: under --response-max-kb, but 9 bytes each in the encoded
    // result, over the 1 MiB a result may carry.
    let numbers = format!("[{}0.5]", "0.5,".repeat(200_000));
    let app = Router::new()
        .route("/v1/logo", get(move || async move { ([(header::CONTENT_TYPE, "image/png")], png) }))
        .route("/v1/numbers", get(move || async move { ([(header::CONTENT_TYPE, "application/json")], numbers) }));
    let port = listen(app).await?;
    let (grid, client) = http_grid(&[port], &["--response-max-kb", "960"]).await?;

    // Before, its bytes became U+FFFD characters in a successful output.
    let url = format!("http://127.0.0.1:{port}/v1/logo");
    let view = call(&grid, &client, json!({ "url": url })).await?;
    let error = view.error.clone().expect("refused");
    assert_eq!((error.code.as_str(), view.steps[0].attempts), ("binary_response", 1), "{view:?}");
    assert!(error.message.contains("image/png") && error.message.contains(&url), "{error:?}");

    // Before, the SDK's stand-in: "the task's result is over the grid's payload limit".
    let url = format!("http://127.0.0.1:{port}/v1/numbers");
    let view = call(&grid, &client, json!({ "url": url })).await?;
    let error = view.error.clone().expect("refused");
    assert_eq!(error.code, "payload_too_large", "{view:?}");
    assert!(error.message.contains(&url), "{error:?}");

    // A body of --response-max-kb 1024 would leave no room for the rest of the output: the
    // worker does not start (before, it did).
    let mut worker = std::process::Command::new(flowgrid_bin());
    worker.args(["--nats-url", &grid.nats_url, "http-worker", "--allow", "http://127.0.0.1:1/"]);
    let mut worker = worker.args(["--response-max-kb", "1024"]).stderr(std::process::Stdio::piped()).spawn()?;
    let started = std::time::Instant::now();
    while worker.try_wait()?.is_none() && started.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = worker.kill();
    let output = worker.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("--response-max-kb") && text.contains("1..=960"), "{text}");
    Ok(())
}
