//! A run's history in words: one line per record, for `flowgrid run history` and the UI.

use flowgrid_engine::{Event, TimerKey};
use flowgrid_model::AttemptId;
use flowgrid_proto::HistoryRecord;
use serde_json::Value;

/// Longest JSON value shown in a line (an input, an output, signal data) before it is cut.
const VALUE_CHARS_MAX: usize = 160;

/// What a record says, in one line.
pub fn describe(record: &HistoryRecord) -> String {
    if let Some(start) = &record.started {
        let mut line = format!("started {}@{} with input {}", start.flow, start.version, short(&start.input));
        if let Some(parent) = &start.parent {
            line.push_str(&format!(", by step {} of run {}", parent.step, parent.run_id));
        }
        if !start.labels.is_empty() {
            let labels: Vec<String> = start.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
            line.push_str(&format!(", labels {}", labels.join(", ")));
        }
        if start.queued {
            line.push_str(", queued behind its flow's concurrency limit");
        }
        if let Some(start_at_ms) = start.start_at_ms {
            line.push_str(&format!(", to start at {}", crate::output::utc_time(start_at_ms)));
        }
        return line;
    }
    match &record.event {
        Some(event) => describe_event(event),
        None => "(an empty record)".to_owned(),
    }
}

fn describe_event(event: &Event) -> String {
    match event {
        Event::TaskSucceeded { attempt, output } => format!("{} succeeded: {}", attempt_name(attempt), short(output)),
        Event::TaskCached { attempt, output } => {
            format!("{} answered from the task cache: {}", attempt_name(attempt), short(output))
        }
        Event::TaskFailed { attempt, error } => {
            let final_word = if error.retryable { "" } else { " (not retryable)" };
            format!("{} failed{final_word}: {}: {}", attempt_name(attempt), error.code, error.message)
        }
        Event::TaskProgress { attempt, details } => {
            format!("{} reported progress {}", attempt_name(attempt), short(details))
        }
        Event::TimerFired { timer } => match timer {
            TimerKey::RetryDue { attempt } => format!("{} due after its backoff", attempt_name(attempt)),
            TimerKey::AttemptTimeout { attempt } => format!("{} timed out", attempt_name(attempt)),
            TimerKey::RunTimeout => "the run's timeout passed".to_owned(),
            TimerKey::WaitOver { step } => format!("the wait of step {step} is over"),
            TimerKey::SignalTimeout { step } => format!("step {step} got no signal in time"),
            TimerKey::SubflowTimeout { step } => format!("the child runs of step {step} did not end in time"),
            TimerKey::StartDue => "its start time came".to_owned(),
        },
        Event::CancelRequested { reason } => format!("cancel asked: {reason}"),
        Event::SignalReceived { step, data, .. } => format!("signal for step {step}: {}", short(data)),
        Event::ChildEnded { step, item, child, status, output, error, refused, .. } => {
            let item = item.map(|item| format!("[{item}]")).unwrap_or_default();
            if *refused {
                let why =
                    error.as_ref().map(|error| format!(": {}: {}", error.code, error.message)).unwrap_or_default();
                return format!("the child run {child} of step {step}{item} could not be started{why}");
            }
            let what = match (output, error) {
                (_, Some(error)) => format!(": {}: {}", error.code, error.message),
                (Some(output), None) => format!(": {}", short(output)),
                (None, None) => String::new(),
            };
            format!("child run {child} of step {step}{item} {}{what}", status.as_str())
        }
        Event::PauseRequested { reason } => format!("paused: {reason}"),
        Event::ResumeRequested { reason } => format!("resumed: {reason}"),
        Event::Redriven { reason, from, queued } => {
            let from = if from.is_empty() { String::new() } else { format!(" from step {}", from.join(", ")) };
            let queued = if *queued { ", queued behind its flow's concurrency limit" } else { "" };
            format!("redriven{from}{queued}: {reason}")
        }
        Event::Admitted => "admitted by its flow's concurrency limit".to_owned(),
    }
}

/// `step attempt N`, or `step[item] attempt N` for a map item.
fn attempt_name(attempt: &AttemptId) -> String {
    match attempt.item {
        Some(item) => format!("{}[{item}] attempt {}", attempt.step, attempt.attempt),
        None => format!("{} attempt {}", attempt.step, attempt.attempt),
    }
}

/// A value as compact JSON, cut after [`VALUE_CHARS_MAX`] characters.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(VALUE_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use flowgrid_engine::{RunStatus, TaskError};
    use flowgrid_model::RunId;
    use flowgrid_proto::HistoryStart;
    use serde_json::json;

    use super::*;

    fn record(event: Event) -> HistoryRecord {
        HistoryRecord { seq: 1, at_ms: 0, started: None, event: Some(event) }
    }

    fn attempt(item: Option<u32>, number: u32) -> AttemptId {
        AttemptId { run_id: RunId("r".into()), step: "fetch".into(), item, attempt: number }
    }

    #[test]
    fn records_read_as_sentences() {
        let start = HistoryStart {
            flow: "media".into(),
            version: 2,
            input: json!({"video": "talk.mp4"}),
            parent: None,
            labels: [("customer".to_owned(), "acme".to_owned())].into(),
            queued: true,
            start_at_ms: None,
        };
        let started = HistoryRecord { seq: 0, at_ms: 0, started: Some(start), event: None };
        assert_eq!(
            describe(&started),
            "started media@2 with input {\"video\":\"talk.mp4\"}, labels customer=acme, queued behind its flow's \
             concurrency limit"
        );
        let failed = Event::TaskFailed {
            attempt: attempt(Some(3), 2),
            error: TaskError { code: "busy".into(), message: "try later".into(), retryable: true },
        };
        assert_eq!(describe(&record(failed)), "fetch[3] attempt 2 failed: busy: try later");
        let cached = Event::TaskCached { attempt: attempt(None, 1), output: json!({"body": "b"}) };
        assert_eq!(describe(&record(cached)), "fetch attempt 1 answered from the task cache: {\"body\":\"b\"}");
        let timer = Event::TimerFired { timer: TimerKey::RetryDue { attempt: attempt(None, 3) } };
        assert_eq!(describe(&record(timer)), "fetch attempt 3 due after its backoff");
        let child = Event::ChildEnded {
            step: "encode".into(),
            item: Some(1),
            child: RunId("c".into()),
            status: RunStatus::Succeeded,
            output: Some(json!(7)),
            error: None,
            refused: false,
            keeps_round: false,
        };
        assert_eq!(describe(&record(child)), "child run c of step encode[1] succeeded: 7");
        let long = Event::SignalReceived { step: "review".into(), data: json!("x".repeat(500)), id: None };
        let line = describe(&record(long));
        assert!(line.ends_with("...") && line.chars().count() < 200, "{line}");
    }
}
