//! Pipelined JetStream publishing with one subscription for every acknowledgement.
//!
//! `async_nats::jetstream::Context::publish` makes each publish a request: a fresh inbox,
//! a oneshot channel, a semaphore permit, two timers, and an untagged JSON parse of the
//! ack; at tens of thousands of tasks a second that shows in a coordinator's profile
//! (docs/performance.md). A [`StreamPublisher`] instead gives each publish the reply subject `<inbox>.<token>`,
//! receives every ack on one wildcard subscription, and matches it to the caller's tag by
//! the token.
//!
//! Invariants:
//! - Every publish ends in exactly one outcome from [`StreamPublisher::next`]: the
//!   stream's ack, its refusal, or [`PublishFailure::TimedOut`] when no ack came within
//!   the timeout. An ack that arrives after its timeout is ignored (the caller already
//!   retried or gave up; a `Nats-Msg-Id` header makes the retry harmless).
//! - Time-outs are checked on a [`TIMEOUT_CHECK`] tick, so one fires up to that much late.
//! - The caller bounds what is in flight ([`StreamPublisher::in_flight`]); the pending
//!   table holds one entry per unacknowledged publish.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode, Subject, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How often [`StreamPublisher::next`] looks for publishes past their timeout.
pub const TIMEOUT_CHECK: Duration = Duration::from_millis(250);

/// Why a publish was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishFailure {
    /// No ack within the timeout: the broker is slow or down, or the ack was lost.
    TimedOut,
    /// No stream captures the subject.
    NoStream,
    /// The stream refused the message (full, wrong sequence, ...), with its description.
    Refused(String),
    /// The message was not sent (too large, or the connection is closed).
    NotSent(String),
}

impl fmt::Display for PublishFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishFailure::TimedOut => formatter.write_str("no acknowledgement from JetStream in time"),
            PublishFailure::NoStream => formatter.write_str("no JetStream stream captures the subject"),
            PublishFailure::Refused(description) => write!(formatter, "the stream refused the message: {description}"),
            PublishFailure::NotSent(detail) => write!(formatter, "the message was not sent: {detail}"),
        }
    }
}

impl std::error::Error for PublishFailure {}

/// Publishes to JetStream and hands back each publish's tag with its outcome.
pub struct StreamPublisher<Tag> {
    client: async_nats::Client,
    /// `<inbox>.`: every reply subject starts with it.
    reply_prefix: String,
    acks: Subscriber,
    timeout: Duration,
    next_token: u64,
    pending: HashMap<u64, Pending<Tag>>,
    /// Tokens in publish order, so by deadline; acknowledged ones are skipped lazily.
    deadlines: VecDeque<u64>,
    tick: Interval,
}

struct Pending<Tag> {
    deadline: Instant,
    tag: Tag,
}

/// The part of a JetStream publish ack that tells success from refusal.
#[derive(Deserialize)]
struct AckReply {
    error: Option<AckError>,
}

#[derive(Deserialize)]
struct AckError {
    #[serde(default)]
    description: String,
}

impl<Tag> StreamPublisher<Tag> {
    /// Subscribes to a fresh inbox of `client` for the acks; `timeout` bounds the wait for
    /// each one.
    pub async fn new(client: async_nats::Client, timeout: Duration) -> Result<Self, async_nats::SubscribeError> {
        let reply_prefix = format!("{}.", client.new_inbox());
        let acks = client.subscribe(format!("{reply_prefix}*")).await?;
        let mut tick = tokio::time::interval(TIMEOUT_CHECK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(StreamPublisher {
            client,
            reply_prefix,
            acks,
            timeout,
            next_token: 0,
            pending: HashMap::new(),
            deadlines: VecDeque::new(),
            tick,
        })
    }

    /// Publishes without waiting for the ack; its outcome comes from [`Self::next`].
    /// Waits only while the connection's send queue is full. A message that cannot be
    /// sent at all is an immediate error, and `tag` comes back with it.
    pub async fn publish(
        &mut self,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
        tag: Tag,
    ) -> Result<(), (Tag, PublishFailure)> {
        let token = self.next_token;
        self.next_token += 1;
        let reply = Subject::from(format!("{}{token}", self.reply_prefix));
        if let Err(error) = self.client.publish_with_reply_and_headers(subject, reply, headers, payload).await {
            return Err((tag, PublishFailure::NotSent(error.to_string())));
        }
        self.pending.insert(token, Pending { deadline: Instant::now() + self.timeout, tag });
        self.deadlines.push_back(token);
        Ok(())
    }

    /// Publishes awaiting their outcome.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The next outcome: an ack, a refusal or a time-out. Pending forever while nothing is
    /// in flight; `None` once the connection's subscription ended. Cancel-safe, so it can
    /// be one branch of a `select!`.
    pub async fn next(&mut self) -> Option<(Tag, Result<(), PublishFailure>)> {
        loop {
            if let Some(expired) = self.expired(Instant::now()) {
                return Some((expired, Err(PublishFailure::TimedOut)));
            }
            tokio::select! {
                message = self.acks.next() => {
                    let message = message?;
                    if let Some(outcome) = self.settle(&message) {
                        return Some(outcome);
                    }
                }
                _ = self.tick.tick(), if !self.pending.is_empty() => {}
            }
        }
    }

    /// Takes the oldest publish past its deadline, if any.
    fn expired(&mut self, now: Instant) -> Option<Tag> {
        while let Some(&token) = self.deadlines.front() {
            match self.pending.get(&token) {
                None => {
                    self.deadlines.pop_front();
                }
                Some(pending) if pending.deadline <= now => {
                    self.deadlines.pop_front();
                    return self.pending.remove(&token).map(|pending| pending.tag);
                }
                Some(_) => return None,
            }
        }
        None
    }

    /// Matches an ack to its publish; `None` for a reply nobody waits for any more.
    fn settle(&mut self, message: &async_nats::Message) -> Option<(Tag, Result<(), PublishFailure>)> {
        let token: u64 = message.subject.as_str().strip_prefix(self.reply_prefix.as_str())?.parse().ok()?;
        let pending = self.pending.remove(&token)?;
        // Acks mostly come in publish order: drop settled tokens from the front now, so the
        // deadline queue stays as long as what is in flight.
        while self.deadlines.front().is_some_and(|front| !self.pending.contains_key(front)) {
            self.deadlines.pop_front();
        }
        Some((pending.tag, ack_outcome(message)))
    }
}

/// Reads a JetStream publish ack (or the server's no-responders status).
fn ack_outcome(message: &async_nats::Message) -> Result<(), PublishFailure> {
    if message.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(PublishFailure::NoStream);
    }
    match serde_json::from_slice::<AckReply>(&message.payload) {
        Ok(AckReply { error: None }) => Ok(()),
        Ok(AckReply { error: Some(error) }) => Err(PublishFailure::Refused(error.description)),
        Err(error) => Err(PublishFailure::Refused(format!("unreadable acknowledgement ({error})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &str, status: Option<StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from(payload.to_owned()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn acks_refusals_and_no_responders_are_told_apart() {
        assert_eq!(ack_outcome(&reply(r#"{"stream":"t","seq":7}"#, None)), Ok(()));
        assert_eq!(ack_outcome(&reply(r#"{"stream":"t","seq":7,"duplicate":true}"#, None)), Ok(()));
        assert_eq!(
            ack_outcome(&reply(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                None
            )),
            Err(PublishFailure::Refused("maximum messages exceeded".into()))
        );
        assert_eq!(ack_outcome(&reply("", Some(StatusCode::NO_RESPONDERS))), Err(PublishFailure::NoStream));
        assert!(matches!(ack_outcome(&reply("not json", None)), Err(PublishFailure::Refused(_))));
    }
}
