//! Task tokens: an open attempt, written as a string, that another process completes.
//!
//! An async task's worker takes the task, hands its token to whatever finishes the work (a
//! person reviewing, a batch job, a webhook of another service), and acks the task without
//! a result ([`crate::Task::detach`]). The attempt stays open until a result arrives for
//! it, from anyone holding the token ([`crate::Client::complete_task`], `flowgrid task
//! complete`), or until its step's `timeout_ms`.
//!
//! The text is `fgt1.` followed by the token's JSON in URL-safe base64 without padding:
//! `{"attempt": {...}, "reply_to": "...", "deadline_ms": ...}`. A result for the token is
//! a `TaskResult` for `attempt`, sent as a request to `reply_to`, as a worker sends it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use flowgrid_model::{AttemptId, Millis};

/// What a token's text starts with: its format's version.
const PREFIX: &str = "fgt1.";

/// An open attempt, and where its result goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskToken {
    pub attempt: AttemptId,
    /// The subject the attempt's result is sent to, as a request.
    pub reply_to: String,
    /// When the coordinator times the attempt out (Unix ms): a result after it is not applied.
    pub deadline_ms: Millis,
}

impl TaskToken {
    /// The token as text, to hand to whatever completes the task.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a task token is plain data");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a token's text; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<TaskToken, String> {
        let text = text.trim();
        let Some(body) = text.strip_prefix(PREFIX) else {
            return Err(format!("not a task token: it should start with `{PREFIX}`"));
        };
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|error| format!("not a task token: its text after `{PREFIX}` is not URL-safe base64 ({error})"))?;
        serde_json::from_slice(&json).map_err(|error| format!("not a task token: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use flowgrid_model::RunId;

    use super::*;

    #[test]
    fn a_token_survives_its_text_and_bad_text_is_named() {
        let token = TaskToken {
            attempt: AttemptId { run_id: RunId("r-1".into()), step: "review".into(), item: Some(2), attempt: 1 },
            reply_to: "flowgrid.shard.7.result".into(),
            deadline_ms: 1_767_225_600_000,
        };
        let text = token.encode();
        assert!(text.starts_with("fgt1.") && !text.contains(['+', '/', '=']), "{text}");
        assert_eq!(TaskToken::decode(&format!(" {text}\n")), Ok(token));
        assert!(TaskToken::decode("abc").unwrap_err().contains("should start with `fgt1.`"));
        assert!(TaskToken::decode("fgt1.***").unwrap_err().contains("URL-safe base64"));
        let not_json = format!("fgt1.{}", URL_SAFE_NO_PAD.encode(b"[1]"));
        assert!(TaskToken::decode(&not_json).unwrap_err().starts_with("not a task token:"));
    }
}
