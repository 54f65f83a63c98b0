//! Whether a flow's trigger could ever start a run, as far as NATS can tell before the flow
//! is deployed: its stream exists, takes a subject the trigger's could match, and keeps its
//! messages for the trigger's consumer. The grid's deploy refuses a trigger that fails any
//! of these, and `flowgrid flow deploy` of several files asks the same of each before it
//! deploys any, so that one the grid would refuse keeps them all from deploying: both call
//! [`check_trigger_stream`], so they cannot disagree.
//!
//! A refusal is an [`Issue`] of the definition, at `trigger.stream` or `trigger.subject`;
//! a lookup NATS did not answer says nothing of the trigger and is worth retrying.

use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, RetentionPolicy};
use async_nats::jetstream::Context;
use flowgrid_model::{FlowDefinition, Issue, Trigger};
use flowgrid_proto::Subjects;

/// Why [`check_trigger_stream`] does not pass a trigger.
#[derive(Debug, thiserror::Error)]
pub enum TriggerStreamError {
    /// The trigger could never start a run: fix the definition at the issue's path
    /// (`trigger.stream` or `trigger.subject`) as its message says, or the stream.
    #[error("{0}")]
    Refused(Issue),
    /// NATS did not answer the lookup of `what` (the trigger's stream or consumer), so
    /// nothing is known of the trigger yet: retry.
    #[error("cannot look up {what} ({source}); retry")]
    Lookup {
        what: String,
        #[source]
        source: async_nats::Error,
    },
}

/// Refuses a trigger that could never start a run: its stream does not exist, takes no
/// subject the trigger's could match ([`check_trigger_subject`]), or keeps a message only
/// for the consumers there when it is published while the trigger's consumer (`consumer`,
/// see [`Subjects::trigger_consumer`]) was not made beforehand; or that would lose
/// messages: its consumer, made by hand, does not acknowledge each message on its own.
pub async fn check_trigger_stream(
    jetstream: &Context,
    trigger: &Trigger,
    consumer: &str,
) -> Result<(), TriggerStreamError> {
    let name = &trigger.stream;
    let stream = match jetstream.get_stream(name).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(error.kind(), GetStreamErrorKind::JetStream(refusal)
                if refusal.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let subjects = trigger.subject.as_deref().unwrap_or("events.>");
            let message = format!(
                "there is no JetStream stream {name:?} on this grid's NATS: create it first, e.g. `nats stream add \
                 {name} --subjects '{subjects}' --defaults`"
            );
            return Err(refusal("trigger.stream", message));
        }
        Err(error) => {
            return Err(TriggerStreamError::Lookup {
                what: format!("the trigger's stream {name:?}"),
                source: error.into(),
            })
        }
    };
    let config = &stream.cached_info().config;
    if let Some(subject) = &trigger.subject {
        check_trigger_subject(config, subject)?;
    }
    // A consumer made by hand before the deploy is read as it is: NATS does not let its ack
    // policy change. On a stream of another retention than limits, one delivering every
    // message serves: the trigger keeps the deliver policy of a consumer it finds.
    let ack_policy = match stream.consumer_info(consumer).await {
        Ok(info) => Some(info.config.ack_policy),
        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => None,
        Err(error) => {
            return Err(TriggerStreamError::Lookup {
                what: format!("the trigger's consumer {consumer:?} on stream {name:?}"),
                source: error.into(),
            })
        }
    };
    match ack_policy {
        Some(policy) if policy != AckPolicy::Explicit => {
            Err(refusal("trigger.stream", not_explicit_acks(name, consumer, policy)))
        }
        None if config.retention != RetentionPolicy::Limits => {
            Err(refusal("trigger.stream", retention_refusal(name, config.retention, consumer)))
        }
        _ => Ok(()),
    }
}

/// Why a trigger cannot read through its consumer `consumer` on `stream` made by hand with
/// `ack_policy` (not explicit), and what to do about it.
pub fn not_explicit_acks(stream: &str, consumer: &str, ack_policy: AckPolicy) -> String {
    // As NATS names it (`all`, `none`).
    let policy = match serde_json::to_value(ack_policy) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{ack_policy:?}"),
    };
    format!(
        "the trigger's consumer {consumer:?} on stream {stream:?} has ack policy `{policy}`, not `explicit`, which \
         NATS does not let change: acknowledging one message would acknowledge others, or none would come back, and \
         their runs would not start; delete it (`nats consumer rm {stream} {consumer}`) to have the trigger make it, \
         or make it again with explicit acks (`--ack explicit`)"
    )
}

/// The problem of a flow that announces its ends on the run-ends stream and whose trigger
/// reads its own announcements: each of its runs would start another, without end. `None`
/// for a flow without a trigger, or whose trigger cannot read its own ends.
pub fn trigger_loop(subjects: &Subjects, definition: &FlowDefinition) -> Option<Issue> {
    let trigger = definition.trigger.as_ref()?;
    let own_ends = subjects.run_ended(&definition.name);
    let reads_own_ends = definition.publish_ended
        && trigger.stream == subjects.run_ends_stream()
        && trigger.subject.as_deref().is_none_or(|filter| flowgrid_proto::subject_matches(filter, &own_ends));
    if !reads_own_ends {
        return None;
    }
    let message = format!(
        "the flow announces its ends on {own_ends:?}, which its trigger reads: each run would start another, without \
         end; narrow `trigger.subject` to the flows it watches ({:?} for flow <name>)",
        subjects.run_ended("<name>")
    );
    Some(Issue { path: "trigger.subject".to_owned(), message })
}

/// Why a trigger cannot read a stream of `retention` (not limits) through a consumer the
/// grid makes (`consumer`), and what to do instead. The trigger's consumer starts at the
/// time of the first deploy (or, on a stream made again since, at its first message).
fn retention_refusal(stream: &str, retention: RetentionPolicy, consumer: &str) -> String {
    let why = match retention {
        RetentionPolicy::WorkQueue => {
            "work-queue retention: NATS lets a consumer of such a stream start only at its first message, and a \
             trigger's consumer starts at the time of its deploy, so it could not be made and no message would start \
             a run"
        }
        _ => {
            "interest retention: it drops a message no consumer is there to take, so the messages published before \
             the trigger's consumer is made (after the deploy, or after the stream is made again) would start no run"
        }
    };
    format!(
        "stream {stream:?} has {why}; use a stream with limits retention (`nats stream add {stream} --retention \
         limits`, the default), or make the trigger's consumer {consumer:?} on it before deploying (a durable pull \
         consumer with explicit acks that delivers all messages)"
    )
}

/// Refuses a trigger subject that no subject of its stream could match: NATS makes such a
/// consumer, and no message ever reaches it. A stream that takes the messages of other
/// streams (a mirror, sources) or stores them under other subjects (a subject transform)
/// is not judged by its own subjects.
fn check_trigger_subject(stream: &Config, subject: &str) -> Result<(), TriggerStreamError> {
    let judged = stream.mirror.is_none()
        && stream.sources.as_ref().is_none_or(Vec::is_empty)
        && stream.subject_transform.is_none()
        && !stream.subjects.is_empty();
    if !judged || stream.subjects.iter().any(|taken| subjects_overlap(subject, taken)) {
        return Ok(());
    }
    let message = format!(
        "{subject:?} matches no subject of stream {:?}, which takes `{}`: no message would reach the trigger; give a \
         subject the stream takes, or add it to the stream's subjects",
        stream.name,
        stream.subjects.join("`, `")
    );
    Err(refusal("trigger.subject", message))
}

/// Whether some subject matches both `left` and `right` (each with `*` for one token and
/// `>` for one or more at the end).
fn subjects_overlap(left: &str, right: &str) -> bool {
    let (mut left, mut right) = (left.split('.'), right.split('.'));
    loop {
        match (left.next(), right.next()) {
            (None, None) | (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(one), Some(other)) if one == other || one == "*" || other == "*" => {}
            _ => return false,
        }
    }
}

/// The refusal of a trigger with a problem at `path`.
fn refusal(path: &str, message: String) -> TriggerStreamError {
    TriggerStreamError::Refused(Issue { path: path.to_owned(), message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_overlap_when_some_subject_matches_both() {
        for (left, right) in [
            ("orders.eu.created", "orders.>"),
            ("orders.*.created", "orders.eu.created"),
            ("*.eu.*", "orders.>"),
            ("orders.>", "orders.eu"),
            (">", "a"),
            ("*", ">"),
            ("a.*", "a.>"),
        ] {
            assert!(subjects_overlap(left, right) && subjects_overlap(right, left), "{left} and {right}");
        }
        for (left, right) in [
            ("invoices.*.created", "orders.>"),
            ("orders", "orders.>"),
            ("*", "orders.>"),
            ("orders.eu", "orders.*.created"),
            ("a.b", "a.b.c"),
            ("a.*.c", "a.b.d"),
        ] {
            assert!(!subjects_overlap(left, right) && !subjects_overlap(right, left), "{left} and {right}");
        }
    }

    /// A stream's own subjects judge a trigger's only when they are where its messages are.
    #[test]
    fn a_subject_no_subject_of_the_stream_matches_is_refused_unless_the_stream_takes_others() {
        let orders = Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() };
        assert!(check_trigger_subject(&orders, "orders.*.created").is_ok());
        let Err(TriggerStreamError::Refused(issue)) = check_trigger_subject(&orders, "invoices.>") else {
            panic!("a subject the stream never takes")
        };
        assert_eq!(issue.path, "trigger.subject");
        assert!(issue.message.contains("`orders.>`"), "the stream's subjects are named: {}", issue.message);
        let mirror = Config {
            mirror: Some(async_nats::jetstream::stream::Source { name: "UPSTREAM".into(), ..Default::default() }),
            ..orders
        };
        assert!(check_trigger_subject(&mirror, "invoices.>").is_ok(), "a mirror stores the subjects of another");
    }
}
