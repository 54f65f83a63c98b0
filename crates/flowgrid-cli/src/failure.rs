//! Turning an error into a message that says what to fix, and an exit code.

use std::process::ExitCode;

use flowgrid_model::RunId;
use flowgrid_proto::{ApiError, ErrorCode, Reply};

use crate::commands::{not_joined_hint, NotJoined};
use crate::output::print_json;
use crate::Session;

/// Exit code of an invalid flow definition (and of bad usage, as clap does).
pub const EXIT_INVALID: u8 = 2;

/// Arguments a command cannot take together (clap's checks cannot say so): reported as
/// clap reports bad usage, with exit code 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `anyhow::ensure!` for bad usage: fails with a [`Usage`] error (exit code 2).
#[macro_export]
macro_rules! ensure_usage {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(anyhow::Error::new($crate::failure::Usage(format!($($message)+))));
        }
    };
}

/// What a command had the grid do (start a run, redrive one) before the failure after it
/// (waiting for the run): the run goes on, and running the same command again would do it
/// once more. Its message names the run and how to follow it; under `--json` the failure
/// says `retryable: false`, whatever failed after.
#[derive(Debug)]
pub enum Applied {
    Started(RunId),
    Redriven(RunId),
}

impl Applied {
    /// The run started or redriven.
    pub fn run_id(&self) -> &RunId {
        match self {
            Applied::Started(run_id) | Applied::Redriven(run_id) => run_id,
        }
    }
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let run_id = self.run_id();
        let (done, again) = match self {
            Applied::Started(_) => ("started", "start another run"),
            Applied::Redriven(_) => ("redriven", "redrive it once more"),
        };
        write!(
            f,
            "run {run_id} was {done}, but waiting for it failed: follow it with `flowgrid run watch {run_id}` \
             (running this command again would {again})"
        )
    }
}

impl std::error::Error for Applied {}

/// Prints `error` (and a hint) to stderr, and under `--json` a refusal as
/// `{"error": ...}` to stdout; returns the exit code.
pub fn report(error: &anyhow::Error, session: &Session) -> ExitCode {
    let refusal = find::<flowgrid_sdk::Error>(error).and_then(flowgrid_sdk::Error::api);
    if let (Some(refusal), None) = (refusal, find::<Applied>(error)) {
        return report_refusal(refusal, session);
    }
    let message = render_chain(error);
    let usage = find::<Usage>(error).is_some();
    if session.json {
        // Every failure is a JSON answer under --json, not only the grid's refusals.
        let _ = print_json(&Reply::<()>::Error(json_error(error, message.clone(), usage)));
    }
    eprintln!("error: {message}");
    if let Some(hint) = hint(error, session) {
        eprintln!("hint: {hint}");
    }
    if usage {
        ExitCode::from(EXIT_INVALID)
    } else {
        ExitCode::FAILURE
    }
}

/// The code a failure that is no refusal of the grid takes under `--json`, and whether the
/// same command may simply be run again: bad usage; the grid out of reach (NATS, or no
/// coordinator answering: again, yes); a request not answered in time (it may have been
/// applied: see the hint); anything else.
fn local_code(error: &anyhow::Error, usage: bool) -> (ErrorCode, bool) {
    if usage {
        return (ErrorCode::InvalidRequest, false);
    }
    match find::<flowgrid_sdk::Error>(error) {
        Some(flowgrid_sdk::Error::Connect { .. }) => (ErrorCode::Unavailable, true),
        Some(other) if other.is_no_responders() => (ErrorCode::Unavailable, true),
        Some(flowgrid_sdk::Error::Timeout { .. }) => (ErrorCode::Unavailable, false),
        _ => (ErrorCode::Internal, false),
    }
}

/// The `{"error": ...}` answer under `--json` of a failure [`report_refusal`] does not
/// report: a refusal of the grid after the command's change was applied keeps its code,
/// anything else takes [`local_code`]'s; with an [`Applied`] change it is never retryable.
fn json_error(error: &anyhow::Error, message: String, usage: bool) -> ApiError {
    let refusal = find::<flowgrid_sdk::Error>(error).and_then(flowgrid_sdk::Error::api);
    let mut answer = match refusal {
        Some(refusal) => ApiError { message, ..refusal.clone() },
        None => {
            let (code, retryable) = local_code(error, usage);
            ApiError { retryable, ..ApiError::new(code, message) }
        }
    };
    if find::<Applied>(error).is_some() {
        answer.retryable = false;
    }
    answer
}

fn report_refusal(refusal: &ApiError, session: &Session) -> ExitCode {
    if session.json {
        let _ = print_json(&Reply::<()>::Error(refusal.clone()));
    }
    if refusal.issues.is_empty() {
        eprintln!("error: {refusal}");
    } else if refusal.code == ErrorCode::InvalidDefinition {
        let count = refusal.issues.len();
        eprintln!("error: {}: {count} problem{}:", refusal.code, if count == 1 { "" } else { "s" });
    } else {
        eprintln!("error: {}:", refusal.message);
    }
    for issue in &refusal.issues {
        eprintln!("  {issue}");
    }
    if let Some(hint) = refusal_hint(refusal) {
        eprintln!("hint: {hint}");
    }
    if refusal.code == ErrorCode::InvalidDefinition {
        ExitCode::from(EXIT_INVALID)
    } else {
        ExitCode::FAILURE
    }
}

/// What to do about a refusal, where its message does not say it already.
fn refusal_hint(refusal: &ApiError) -> Option<&'static str> {
    match refusal.code {
        // A run that has no such step is found: its message names what to do.
        ErrorCode::NotFound if refusal.message.contains("has no step") => None,
        ErrorCode::NotFound => Some("check the name or id with `flowgrid flow list` or `flowgrid run list`"),
        // Not retryable: the request may have been applied, as its message says.
        ErrorCode::Unavailable if !refusal.retryable => None,
        ErrorCode::Overloaded | ErrorCode::Unavailable => Some("the grid is busy or moving shards; try again shortly"),
        ErrorCode::InvalidDefinition => Some("fix the definition at the paths above and deploy again"),
        _ => None,
    }
}

fn hint(error: &anyhow::Error, session: &Session) -> Option<String> {
    // Its message says what to do: follow the run, not try the command again.
    if find::<Applied>(error).is_some() {
        return None;
    }
    // Refused credentials or a failed TLS handshake are explained by the error itself.
    let start_nats = |url: &str, source: &async_nats::ConnectError| {
        use async_nats::ConnectErrorKind::{Io, TimedOut};
        let tls = if session.nats_options.tls_required() {
            "; with TLS asked for, check that the server speaks TLS on that port"
        } else {
            "; a server that requires TLS needs --nats-tls or --nats-tls-ca"
        };
        matches!(source.kind(), Io | TimedOut)
            .then(|| format!("start nats-server at {url} (`make up` starts a local grid) or fix --nats-url{tls}"))
    };
    if let Some(sdk_error) = find::<flowgrid_sdk::Error>(error) {
        return match sdk_error {
            flowgrid_sdk::Error::Connect { url, source } => start_nats(url, source),
            flowgrid_sdk::Error::Broker(_) => {
                Some("start nats-server with JetStream enabled (`nats-server -js`)".into())
            }
            // A start without an idempotency key or a redrive, which the SDK does not repeat:
            // its message says that it may have been applied and to read the run first; the
            // hint says with what.
            flowgrid_sdk::Error::Timeout { what, .. } if sdk_error.may_have_been_applied() => {
                Some(if what.contains(".run.redrive") {
                    "`flowgrid run get` shows the run's status and redrive count".into()
                } else {
                    "look for the run with `flowgrid run list`; a start with --idempotency-key is safe to send again"
                        .into()
                })
            }
            flowgrid_sdk::Error::Timeout { .. } => Some(
                "no coordinator answered in time, even when asked again; they may be overloaded or restarting: \
                 check `flowgrid members` and try again"
                    .into(),
            ),
            // The message names the subject and the prefix nobody answers under.
            other if other.is_no_responders() => Some(
                "start a coordinator with `flowgrid coordinator` (or `make up`), or give the grid's --prefix".into(),
            ),
            _ => None,
        };
    }
    if let Some(not_joined) = find::<NotJoined>(error) {
        return Some(not_joined_hint(not_joined));
    }
    if let Some(flowgrid_coordinator::Error::Connect(flowgrid_sdk::Error::Connect { url, source })) =
        find::<flowgrid_coordinator::Error>(error)
    {
        return start_nats(url, source);
    }
    None
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message
/// already holds (many errors print their source themselves).
fn render_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// The first error of type `E` in the chain, a context added with `.context(E)` too (whose
/// link of the chain is anyhow's own wrapper, not an `E`).
fn find<E: std::error::Error + Send + Sync + 'static>(error: &anyhow::Error) -> Option<&E> {
    error.downcast_ref::<E>().or_else(|| error.chain().find_map(|cause| cause.downcast_ref::<E>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_start_is_told_apart_from_requests_already_asked_again() {
        let session = Session {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_options: Default::default(),
            prefix: "flowgrid".into(),
            json: false,
        };
        // As the SDK says them: a request it sent again, and one it may not send again.
        let timeout = |what: &str| {
            anyhow::Error::new(flowgrid_sdk::Error::Timeout {
                what: what.to_owned(),
                after: std::time::Duration::from_secs(15),
            })
        };
        let may_have_applied = ": the grid may have applied it: read the run before sending it again";
        let start = timeout(&format!("request on flowgrid.api.run.start (2 tries){may_have_applied}"));
        let start_hint = hint(&start, &session).unwrap();
        assert!(start_hint.contains("flowgrid run list") && start_hint.contains("--idempotency-key"), "{start_hint}");
        let get = hint(&timeout("request on flowgrid.api.run.get (3 tries)"), &session).unwrap();
        assert!(get.contains("even when asked again") && !get.contains("run list"), "{get}");
        let redrive = timeout(&format!("request on flowgrid.api.run.redrive (1 try){may_have_applied}"));
        let redrive_hint = hint(&redrive, &session).unwrap();
        assert!(redrive_hint.contains("redrive count") && !redrive_hint.contains("try again"), "{redrive_hint}");
        // What the message says already, the hint does not say again.
        for (error, hint) in [(&start, &start_hint), (&redrive, &redrive_hint)] {
            assert!(render_chain(error).contains("may have applied it") && !hint.contains("may have"), "{hint}");
        }
    }

    #[test]
    fn no_coordinator_is_said_once() {
        let session = Session {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_options: Default::default(),
            prefix: "flowgrid".into(),
            json: false,
        };
        let nobody = anyhow::Error::new(flowgrid_sdk::Error::Nats {
            context: "no coordinator answers on flowgrid.api.flow.list (is one running with prefix \"flowgrid\"?)"
                .into(),
            source: Box::new(async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders)),
        });
        let hint = hint(&nobody, &session).unwrap();
        assert!(hint.contains("flowgrid coordinator") && hint.contains("--prefix"), "{hint}");
        assert!(!hint.contains("no coordinator answers"), "{hint}");
        let message = render_chain(&nobody);
        assert_eq!(message.matches("no responders").count(), 1, "{message}");
    }

    #[test]
    fn a_step_the_run_does_not_have_is_not_sent_to_the_lists_of_flows_and_runs() {
        let missing_run = ApiError::new(ErrorCode::NotFound, "no run r1");
        assert!(refusal_hint(&missing_run).is_some_and(|hint| hint.contains("flowgrid run list")));
        let missing_step =
            ApiError::new(ErrorCode::NotFound, "the flow of run r1 has no step `x`: name a signal step of it");
        assert_eq!(refusal_hint(&missing_step), None);
    }

    #[test]
    fn a_refusal_that_may_have_been_applied_is_not_told_to_try_again() {
        let moving = ApiError::new(ErrorCode::Unavailable, "shard 2 is moving to another coordinator; retry");
        assert!(refusal_hint(&moving).is_some_and(|hint| hint.contains("try again")));
        let maybe_applied =
            ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "shard 2 did not answer") };
        assert_eq!(refusal_hint(&maybe_applied), None);
    }

    #[test]
    fn a_failure_after_the_run_was_started_or_redriven_is_not_to_be_run_again() {
        let session = Session {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_options: Default::default(),
            prefix: "flowgrid".into(),
            json: true,
        };
        let nobody = || {
            anyhow::Error::new(flowgrid_sdk::Error::Nats {
                context: "no coordinator answers on flowgrid.api.run.get".into(),
                source: Box::new(async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders)),
            })
        };
        let moving = || {
            let refusal = ApiError { retryable: true, ..ApiError::new(ErrorCode::Unavailable, "shard 2 is moving") };
            anyhow::Error::new(flowgrid_sdk::Error::Api(refusal))
        };
        // Alone, either may simply be sent again.
        assert!(json_error(&nobody(), render_chain(&nobody()), false).retryable);
        let run_id = RunId("r-7".into());
        for (error, again) in [
            (nobody().context(Applied::Started(run_id.clone())), "start another run"),
            (moving().context(Applied::Redriven(run_id.clone())), "redrive it once more"),
        ] {
            let answer = json_error(&error, render_chain(&error), false);
            assert_eq!(answer.code, ErrorCode::Unavailable, "{answer:?}");
            assert!(!answer.retryable, "the run was changed already: {answer:?}");
            assert!(answer.message.contains("flowgrid run watch r-7") && answer.message.contains(again), "{answer:?}");
            assert_eq!(hint(&error, &session), None, "no hint to try again");
        }
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let root = std::io::Error::other("connection refused");
        let error = anyhow::Error::new(root).context("cannot connect: connection refused").context("flow list failed");
        assert_eq!(render_chain(&error), "flow list failed: cannot connect: connection refused");
    }
}
