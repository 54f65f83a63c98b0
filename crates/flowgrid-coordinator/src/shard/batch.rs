//! What one group commit carries: the store writes of every command applied in the
//! batch, and the effects that may only happen once those writes are durable.

use std::sync::Arc;
use std::time::Instant;

use async_nats::Subject;
use flowgrid_engine::{ChildStart, TaskDispatch};

use flowgrid_model::{AttemptId, FlowPlan, RunId};
use flowgrid_proto::{ApiError, Encoding};
use flowgrid_store::WriteBatch;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::Responder;

/// A reply to send after the commit: the prepared value, or the commit's error.
pub type DeferredReply = Box<dyn FnOnce(Option<&ApiError>) + Send>;

/// A worker's result request, answered after the commit.
pub struct ResultReply {
    pub reply_to: Subject,
    pub encoding: Encoding,
    pub applied: bool,
}

/// A worker's result refused on its face (malformed, too large, ...): it changed nothing,
/// so it is answered with its batch whatever becomes of the commit.
pub struct RefusedResult {
    pub reply_to: Subject,
    pub encoding: Encoding,
    pub refusal: ApiError,
}

/// A task to publish after the commit.
pub struct Dispatch {
    pub task: TaskDispatch,
    /// When the shard took the worker's result that led to this task: the task's step
    /// overhead starts there. `None` for a run's first tasks, retries and timers.
    pub result_taken: Option<Instant>,
}

/// A worker's result to store in the task cache after the commit.
pub struct CacheStore {
    pub pool: Arc<str>,
    pub task: Arc<str>,
    pub key: Arc<serde_json::Value>,
    pub output: serde_json::Value,
}

#[derive(Default)]
pub struct Batch {
    pub writes: WriteBatch,
    /// Commands and events applied; bounds the batch.
    pub commands: usize,
    pub dispatches: Vec<Dispatch>,
    pub replies: Vec<DeferredReply>,
    pub result_replies: Vec<ResultReply>,
    pub refused_results: Vec<RefusedResult>,
    /// Runs that ended in this batch: dropped from memory after the commit.
    pub finished: Vec<RunId>,
    /// Flow versions deployed in this batch, and latest versions of flows paused or
    /// resumed: published as latest, their schedule and trigger armed, after the commit.
    pub deployed: Vec<Arc<FlowPlan>>,
    /// Child runs to start after the commit, each with its depth below the top run.
    pub child_starts: Vec<(ChildStart, u32)>,
    /// Keys of the messages put into the outbox by this batch, with their writes' numbers:
    /// sent after the commit.
    pub outbox: Vec<(Vec<u8>, u64)>,
    /// Attempts out with workers that this batch closed without their results, by pool:
    /// their workers are told after the commit.
    pub cancelled: Vec<(Arc<str>, AttemptId)>,
    /// Workers' results of steps that cache them: stored after the commit.
    pub cache_stores: Vec<CacheStore>,
    /// Signals with an id this batch gave its runs, as (run, step, id): a copy that comes
    /// before the commit is answered as taken, as one after it is from the history.
    pub signals: Vec<(RunId, String, String)>,
}

impl Batch {
    /// Replies `value` once the batch is durable (or the commit's error if it fails).
    pub fn reply<T: Send + 'static>(&mut self, responder: Responder<T>, value: Result<T, ApiError>) {
        self.replies.push(Box::new(move |failure: Option<&ApiError>| {
            let outcome = match failure {
                None => value,
                Some(error) => Err(error.clone()),
            };
            // The caller may have given up waiting; nothing to do then.
            let _ = responder.send(outcome);
        }));
    }

    /// Replies with `answer` once the batch is durable (or with the commit's error). A read
    /// left to do runs beside the actor meanwhile, so a long one (a run's whole history)
    /// does not hold the shard; its answer still waits for the batch, as every other reply
    /// of the batch does. If the batch is dropped unanswered (its actor stopped), so is the
    /// responder: the caller is told the shard is unavailable.
    pub fn answer<T: Send + 'static>(&mut self, responder: Responder<T>, answer: Result<Answer<T>, ApiError>) {
        let read = match answer {
            Ok(Answer::Now(value)) => return self.reply(responder, Ok(value)),
            Ok(Answer::AfterRead(read)) => read,
            Err(error) => return self.reply(responder, Err(error)),
        };
        let (committed, commit) = oneshot::channel::<Option<ApiError>>();
        self.replies.push(Box::new(move |failure: Option<&ApiError>| {
            let _ = committed.send(failure.cloned());
        }));
        tokio::spawn(async move {
            let (outcome, commit) = tokio::join!(read, commit);
            let outcome = match commit {
                Ok(None) => outcome,
                Ok(Some(error)) => Err(error),
                Err(_) => return,
            };
            // The caller may have given up waiting; nothing to do then.
            let _ = responder.send(outcome);
        });
    }
}

/// What a command answers: a value it has, or a read of the store still to do.
pub enum Answer<T> {
    Now(T),
    AfterRead(BoxFuture<'static, Result<T, ApiError>>),
}
