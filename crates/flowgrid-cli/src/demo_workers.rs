//! Built-in demo workers: tasks that simulate work with sleeps and return outputs that
//! are deterministic functions of their input (so tests can predict them).
//!
//! Any pool's worker runs any of these tasks; the pool named with each task is where a
//! demo flow would normally send it.
//!
//! | task              | pool      | time  | output |
//! |-------------------|-----------|-------|--------|
//! | `generate`        | gpu-llm   | 40 ms | `{"text", "tokens"}` from `input.prompt` (or the input), tokens capped by `input.max_tokens`; the text's words come first as live output |
//! | `embed`           | gpu-llm   | 10 ms | 8 numbers in [-1, 1] from the input |
//! | `transcode`       | cpu-media | 25 ms | `{"segment": input.segment or the input, "bytes"}` |
//! | `thumbnail`       | cpu-media | 10 ms | `{"thumbnails": [input.count names (default 1)], "width", "height"}` |
//! | `detect_language` | any       | 5 ms  | `{"language": "english", ..., "confidence"}` from `input.hint` (unless `auto`) or the input's text |
//! | `echo`            | any       | -     | the input |
//! | `double`          | any       | -     | a number: twice it; an object: the object with `value` doubled |
//! | `sleep`           | any       | `input.ms` (not scaled) | the input |
//! | `fail`            | any       | -     | error `input.code` (default `boom`), retryable unless `input.retryable == false` |
//! | `flaky`           | any       | -     | error `transient` while attempt < `input.succeed_on_attempt` (or `input.fail_times` + 1; default 2), then the input |
//! | `count`           | any       | -     | the input (each execution is counted, see [`DemoWorkers::count_executions`]) |
//! | `resume`          | any       | `input.to` x `input.step_ms` (default 100, not scaled) | counts to `input.to`, reporting `{"done": k}` after each step and starting from the progress an earlier attempt reported; the first attempt fails (`crashed`, retryable) once it reached `input.fail_at`; output `{"from", "done"}` |
//!
//! An unknown task name fails with `unknown_task`, not retryable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use flowgrid_engine::TaskError;
use flowgrid_sdk::{BoxFuture, Task, TaskHandler};

/// Dimensions of an `embed` vector.
const EMBEDDING_DIMS: usize = 8;
/// Longest `sleep` a task may ask for, so a typo cannot hold a slot for hours.
const SLEEP_MS_MAX: u64 = 600_000;
/// Most thumbnails one `thumbnail` task cuts.
const THUMBNAILS_MAX: u64 = 100;

/// The demo task handler. Cheap to clone; clones share the execution counter.
#[derive(Clone, Debug)]
pub struct DemoWorkers {
    speed: f64,
    count_executions: Arc<AtomicU64>,
}

impl DemoWorkers {
    /// `speed` scales the simulated work time: 0 skips it, 1 is nominal, 2 is twice as slow.
    pub fn new(speed: f64) -> DemoWorkers {
        let speed = if speed.is_finite() && speed > 0.0 { speed } else { 0.0 };
        DemoWorkers { speed, count_executions: Arc::new(AtomicU64::new(0)) }
    }

    /// How many times this worker (and its clones) ran the `count` task.
    pub fn count_executions(&self) -> u64 {
        self.count_executions.load(Ordering::Relaxed)
    }

    /// Runs one task.
    pub async fn run(&self, task: Task) -> Result<Value, TaskError> {
        match task.name() {
            "generate" => {
                let output = generate(task.input());
                // The reply comes word by word as live output, as a model's tokens would.
                let text = output["text"].as_str().unwrap_or_default();
                let words: Vec<&str> = text.split_inclusive(' ').collect();
                for word in &words {
                    self.work(40 / words.len() as u64).await;
                    let _ = task.emit(Value::String((*word).to_owned())).await;
                }
                Ok(output)
            }
            "embed" => {
                self.work(10).await;
                Ok(embed(task.input()))
            }
            "transcode" => {
                self.work(25).await;
                Ok(transcode(task.input()))
            }
            "thumbnail" => {
                self.work(10).await;
                Ok(thumbnail(task.input()))
            }
            "detect_language" => {
                self.work(5).await;
                Ok(detect_language(task.input()))
            }
            "echo" => Ok(task.into_input()),
            "double" => double(task.input()),
            "sleep" => {
                let ms = sleep_ms(task.input())?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(task.into_input())
            }
            "fail" => Err(fail(task.input())),
            "flaky" => flaky(task.attempt_number(), task.into_input()),
            "count" => {
                self.count_executions.fetch_add(1, Ordering::Relaxed);
                Ok(task.into_input())
            }
            "resume" => resume(&task).await,
            "hand_off" => hand_off(&task).await,
            other => Err(TaskError {
                code: "unknown_task".into(),
                message: format!(
                    "the demo workers have no task {other:?}; known: generate, embed, transcode, thumbnail, \
                     detect_language, echo, double, sleep, fail, flaky, count, resume, hand_off"
                ),
                retryable: false,
            }),
        }
    }

    async fn work(&self, nominal_ms: u64) {
        if self.speed > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(nominal_ms as f64 / 1_000.0 * self.speed)).await;
        }
    }
}

impl TaskHandler for DemoWorkers {
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<Value, TaskError>> {
        let workers = self.clone();
        Box::pin(async move { workers.run(task).await })
    }
}

fn generate(input: &Value) -> Value {
    let prompt = text_of(input.get("prompt").unwrap_or(input));
    let words = prompt.split_whitespace().count() as u64;
    let tokens_max = input.get("max_tokens").and_then(Value::as_u64).unwrap_or(u64::MAX);
    json!({
        "text": format!("Generated reply to: {prompt}"),
        "tokens": (words * 3 + 16).min(tokens_max),
    })
}

fn embed(input: &Value) -> Value {
    let seed = fingerprint(&text_of(input.get("text").unwrap_or(input)));
    let vector: Vec<Value> = (0..EMBEDDING_DIMS as u64)
        .map(|dimension| {
            let bits = mix(seed ^ dimension.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let unit = (bits % 20_001) as f64 / 10_000.0 - 1.0;
            json!((unit * 10_000.0).round() / 10_000.0)
        })
        .collect();
    Value::Array(vector)
}

fn transcode(input: &Value) -> Value {
    let segment = input.get("segment").unwrap_or(input).clone();
    let bytes = (segment.to_string().len() as u64) * 1_024 + 4_096;
    json!({ "segment": segment, "bytes": bytes })
}

fn thumbnail(input: &Value) -> Value {
    let source = fingerprint(&input.get("video").or(input.get("segment")).unwrap_or(input).to_string());
    let count = input.get("count").and_then(Value::as_u64).unwrap_or(1).min(THUMBNAILS_MAX);
    let names: Vec<Value> = (0..count).map(|index| json!(format!("thumb-{source:016x}-{index}.jpg"))).collect();
    json!({ "thumbnails": names, "width": 320, "height": 180 })
}

fn detect_language(input: &Value) -> Value {
    let hint = input.get("hint").and_then(Value::as_str).filter(|hint| !hint.is_empty() && *hint != "auto");
    if let Some(hint) = hint {
        return json!({ "language": hint, "confidence": 1.0 });
    }
    let text = text_of(input.get("text").unwrap_or(input));
    let has =
        |ranges: &[(char, char)]| text.chars().any(|c| ranges.iter().any(|(low, high)| (*low..=*high).contains(&c)));
    let language = if has(&[('\u{0400}', '\u{04FF}')]) {
        "russian"
    } else if has(&[('\u{3040}', '\u{30FF}')]) {
        "japanese"
    } else if has(&[('\u{4E00}', '\u{9FFF}')]) {
        "chinese"
    } else if has(&[('ä', 'ä'), ('ö', 'ö'), ('ü', 'ü'), ('ß', 'ß')]) {
        "german"
    } else if has(&[('ñ', 'ñ'), ('¿', '¿'), ('¡', '¡')]) {
        "spanish"
    } else if has(&[('à', 'â'), ('ç', 'ç'), ('è', 'ê')]) {
        "french"
    } else {
        "english"
    };
    json!({ "language": language, "confidence": 0.9 })
}

fn double(input: &Value) -> Result<Value, TaskError> {
    let invalid = || invalid_input(format!("double needs a number or {{\"value\": number}}, got {input}"));
    match input {
        Value::Object(fields) => {
            let doubled = fields.get("value").and_then(twice).ok_or_else(invalid)?;
            let mut output = fields.clone();
            output.insert("value".into(), doubled);
            Ok(Value::Object(output))
        }
        number => twice(number).ok_or_else(invalid),
    }
}

fn twice(number: &Value) -> Option<Value> {
    if let Some(doubled) = number.as_i64().and_then(|integer| integer.checked_mul(2)) {
        return Some(json!(doubled));
    }
    number.as_f64().map(|float| json!(float * 2.0))
}

fn sleep_ms(input: &Value) -> Result<u64, TaskError> {
    let ms = input.get("ms").unwrap_or(input).as_u64();
    match ms {
        Some(ms) if ms <= SLEEP_MS_MAX => Ok(ms),
        _ => Err(invalid_input(format!("sleep needs {{\"ms\": 0..={SLEEP_MS_MAX}}}, got {input}"))),
    }
}

fn fail(input: &Value) -> TaskError {
    TaskError {
        code: input.get("code").and_then(Value::as_str).unwrap_or("boom").to_owned(),
        message: input.get("message").and_then(Value::as_str).unwrap_or("failed on purpose").to_owned(),
        retryable: input.get("retryable").and_then(Value::as_bool).unwrap_or(true),
    }
}

fn flaky(attempt: u32, input: Value) -> Result<Value, TaskError> {
    let fail_times = input.get("fail_times").and_then(Value::as_u64);
    let succeed_on = input.get("succeed_on_attempt").and_then(Value::as_u64).or(fail_times.map(|times| times + 1));
    let succeed_on = succeed_on.unwrap_or(2);
    if u64::from(attempt) < succeed_on {
        return Err(TaskError {
            code: "transient".into(),
            message: format!("attempt {attempt} fails; attempt {succeed_on} will succeed"),
            retryable: true,
        });
    }
    Ok(input)
}

/// Steps a `resume` task may count to.
const RESUME_STEPS_MAX: u64 = 1_000;

/// An async task: hands the attempt off with its task token, shown as the step's progress
/// (`run get`, the UI), for a person or another system to complete with `flowgrid task
/// complete`. The attempt stays open until then, or until the step's `timeout_ms`.
async fn hand_off(task: &Task) -> Result<Value, TaskError> {
    let Some(token) = task.detach() else {
        return Err(invalid_input("hand_off needs a task delivered by the grid".to_owned()));
    };
    let token = token.encode();
    let note = format!("complete it with: flowgrid task complete {token} --output '<json>'");
    // A lost report only hides the token; the attempt is open all the same.
    let _ = task.report_progress(serde_json::json!({ "token": token, "note": note })).await;
    Ok(Value::Null)
}

/// A long job that checkpoints: counts steps, reporting each, and starts where an earlier
/// attempt's last report says it got to.
async fn resume(task: &Task) -> Result<Value, TaskError> {
    let input = task.input();
    let number = |field: &str| input.get(field).and_then(Value::as_u64);
    let (Some(to), step_ms) = (number("to"), number("step_ms").unwrap_or(100)) else {
        return Err(invalid_input(format!("resume needs {{\"to\": 0..={RESUME_STEPS_MAX}}}, got {input}")));
    };
    if to > RESUME_STEPS_MAX || step_ms > SLEEP_MS_MAX {
        return Err(invalid_input(format!("resume takes at most {RESUME_STEPS_MAX} steps of {SLEEP_MS_MAX} ms")));
    }
    let from = task.progress().and_then(|progress| progress.get("done")).and_then(Value::as_u64).unwrap_or(0);
    for done in from + 1..=to {
        tokio::time::sleep(Duration::from_millis(step_ms)).await;
        if let Err(error) = task.report_progress(json!({ "done": done })).await {
            return Err(TaskError { code: "progress_failed".into(), message: error.to_string(), retryable: true });
        }
        if task.attempt_number() == 1 && number("fail_at") == Some(done) {
            let message = format!("failed on purpose after step {done}; the next attempt goes on from there");
            return Err(TaskError { code: "crashed".into(), message, retryable: true });
        }
    }
    Ok(json!({ "from": from, "done": to }))
}

fn invalid_input(message: String) -> TaskError {
    TaskError { code: "invalid_input".into(), message, retryable: false }
}

/// A string as is; anything else as its JSON text.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// FNV-1a: stable across runs and platforms (unlike `DefaultHasher`).
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// splitmix64 finaliser: spreads the bits of a seed.
fn mix(seed: u64) -> u64 {
    let mut bits = seed;
    bits = (bits ^ (bits >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    bits = (bits ^ (bits >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    bits ^ (bits >> 31)
}

#[cfg(test)]
mod tests {
    use flowgrid_model::{AttemptId, RunId};

    use super::*;

    fn task(name: &str, input: Value, attempt: u32) -> Task {
        let id = AttemptId { run_id: RunId("run".into()), step: "step".into(), item: None, attempt };
        Task::new(id, "test", name, input, u64::MAX)
    }

    async fn run(name: &str, input: Value) -> Result<Value, TaskError> {
        DemoWorkers::new(0.0).run(task(name, input, 1)).await
    }

    #[tokio::test]
    async fn outputs_are_deterministic_functions_of_the_input() {
        for name in ["generate", "embed", "transcode", "thumbnail", "detect_language"] {
            let input = json!({"prompt": "hello world", "text": "hello", "segment": 3});
            let first = run(name, input.clone()).await.unwrap();
            assert_eq!(first, run(name, input).await.unwrap(), "{name}");
        }
        let generated = run("generate", json!({"prompt": "two words"})).await.unwrap();
        assert_eq!(generated, json!({"text": "Generated reply to: two words", "tokens": 22}));
        let vector = run("embed", json!("text")).await.unwrap();
        let numbers = vector.as_array().unwrap();
        assert_eq!(numbers.len(), EMBEDDING_DIMS);
        assert!(numbers.iter().all(|number| number.as_f64().is_some_and(|x| (-1.0..=1.0).contains(&x))));
        assert_ne!(vector, run("embed", json!("other text")).await.unwrap());
        assert_eq!(run("transcode", json!({"segment": 7})).await.unwrap()["segment"], json!(7));
        assert_eq!(run("transcode", json!("s1")).await.unwrap()["segment"], json!("s1"));
        assert_eq!(run("detect_language", json!({"text": "¿qué tal?"})).await.unwrap()["language"], "spanish");
        assert_eq!(
            run("detect_language", json!({"video": "talk.mp4", "hint": "auto"})).await.unwrap()["language"],
            "english"
        );
        assert_eq!(run("detect_language", json!({"hint": "german"})).await.unwrap()["language"], "german");
        let thumbs = run("thumbnail", json!({"video": "v.mp4", "count": 4})).await.unwrap();
        assert_eq!(thumbs["thumbnails"].as_array().map(Vec::len), Some(4));
    }

    #[tokio::test]
    async fn test_tasks_follow_their_input() {
        assert_eq!(run("echo", json!({"a": 1})).await.unwrap(), json!({"a": 1}));
        assert_eq!(run("double", json!(21)).await.unwrap(), json!(42));
        assert_eq!(run("double", json!({"value": 1.5, "k": "x"})).await.unwrap(), json!({"value": 3.0, "k": "x"}));
        assert_eq!(run("double", json!({"other": 1})).await.unwrap_err().code, "invalid_input");
        assert_eq!(run("double", json!("x")).await.unwrap_err().code, "invalid_input");
        assert_eq!(run("sleep", json!({"ms": 1})).await.unwrap(), json!({"ms": 1}));
        let error = run("fail", json!({})).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("boom", true));
        let error = run("fail", json!({"code": "bad", "retryable": false})).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("bad", false));
        let error = run("nope", json!(null)).await.unwrap_err();
        assert_eq!((error.code.as_str(), error.retryable), ("unknown_task", false));
    }

    #[tokio::test]
    async fn flaky_fails_until_the_named_attempt() {
        let workers = DemoWorkers::new(0.0);
        let input = json!({"succeed_on_attempt": 3});
        for attempt in 1..=2 {
            let error = workers.run(task("flaky", input.clone(), attempt)).await.unwrap_err();
            assert_eq!((error.code.as_str(), error.retryable), ("transient", true));
        }
        assert_eq!(workers.run(task("flaky", input.clone(), 3)).await.unwrap(), input);
        let twice = json!({"fail_times": 2});
        assert!(workers.run(task("flaky", twice.clone(), 2)).await.is_err());
        assert_eq!(workers.run(task("flaky", twice.clone(), 3)).await.unwrap(), twice);
    }

    #[tokio::test]
    async fn count_counts_every_execution() {
        let workers = DemoWorkers::new(0.0);
        for _ in 0..3 {
            workers.clone().run(task("count", json!(1), 1)).await.unwrap();
        }
        assert_eq!(workers.count_executions(), 3);
    }
}
