//! The shard's side of the task cache: a task whose step caches results is looked up
//! before it goes to the dispatcher, and a fresh result is fed back into the shard as an
//! [`Event::TaskCached`]; a worker's result of such a step is stored after its commit. A
//! miss while another task of the same key is out with a worker waits for that worker's
//! result instead (the cache's single flight).
//! Lookups and stores run beside the actor, so a slow bucket never holds a shard's batch. A
//! lookup stops when its shard reloads or stops, before the shard's flights end: the reload
//! or the shard's next owner looks its open tasks up again. A waiting lookup stops too when
//! its attempt closes (its run cancelled, say): its task is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgrid_engine::{Event, TaskDispatch};
use flowgrid_model::{AttemptId, Millis};
use flowgrid_store::ShardStore;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::actor::ShardActor;
use super::batch::{Batch, CacheStore};
use super::Command;
use crate::cache::{entry_key, Followed, Joined, TaskCache};
use crate::clock::now_ms;

impl<S: ShardStore> ShardActor<S> {
    /// Hands `task` to the dispatcher; first, when its step caches results, asks the cache,
    /// and on a hit sends the stored result to this shard instead. Of the tasks of one key
    /// on this coordinator, one at a time asks the cache and then a worker; the others wait
    /// for what it gets (the cache's single flight).
    pub(super) async fn dispatch(&self, task: TaskDispatch, result_taken: Option<Instant>) {
        let permit = task.cache.as_ref().and_then(|_| self.context.task_cache.permit(&task.pool));
        let Some(permit) = permit else {
            return self.context.dispatcher.send(self.shard, task, result_taken).await;
        };
        let lookup = task.cache.as_ref().expect("only tasks with a cache key are looked up");
        let (key, ttl_ms) = (entry_key(&task.pool, &task.task, &lookup.key), lookup.ttl_ms);
        // Joined here, in the order the shard dispatches: a reload sends its open tasks
        // oldest first, so the task that was already with a worker leads again (its message
        // is a duplicate JetStream drops) and those that waited for it wait again.
        let deadline = deadline_of(&task);
        let joined = self.context.task_cache.flights().join(key.clone(), &task.attempt, deadline);
        let (cache, dispatcher, inbox, shard) =
            (Arc::clone(&self.context.task_cache), self.context.dispatcher.clone(), self.inbox.clone(), self.shard);
        // The lookup belongs to what the shard loaded: once the shard reloads or stops, the
        // reload or the shard's next owner sends the task again, so this copy drops it. Left
        // running, a follower woken by the end of its leader's attempt would lead a flight of
        // its own (a second worker call, or one whose result goes to another coordinator).
        let loaded = self.loaded.clone();
        tokio::spawn(async move {
            let output = match joined {
                Joined::Lead => {
                    let stored = cache.look_up(&task.pool, &task.task, &key, ttl_ms).await;
                    drop(permit);
                    if let Some(landed) = &stored {
                        cache.flights().land(&key, &landed.output, landed.stored_ms);
                    }
                    stored.map(|landed| landed.output)
                }
                Joined::Follow(..) => {
                    drop(permit);
                    TaskCache::count_miss(&task.pool);
                    match follow(&cache, &task, joined, key, deadline, ttl_ms, &loaded).await {
                        Followed::Took(output) => Some(output),
                        Followed::ToWorker => None,
                        // Its attempt closed, or its shard reloaded or moved (which sends it again).
                        Followed::Dropped => return,
                    }
                }
            };
            if loaded.is_cancelled() {
                return;
            }
            if let (Some(output), Some(inbox)) = (output, inbox.upgrade()) {
                let command = Command::CachedResult { attempt: task.attempt.clone(), output };
                // A full inbox or a stopped actor: the worker answers instead.
                if inbox.try_send(command).is_ok() {
                    return;
                }
            }
            dispatcher.send(shard, task, result_taken).await;
        });
    }

    /// A stored result for an attempt that was about to go to a worker.
    pub(super) fn take_cached_result(&mut self, attempt: AttemptId, output: Value, batch: &mut Batch) {
        let run_id = attempt.run_id.clone();
        self.apply_event(&run_id, Event::TaskCached { attempt, output }, now_ms(), batch);
    }

    /// Stores workers' results of steps that cache them (after their commit), and hands
    /// each to the lookups that followed its worker call.
    pub(super) fn store_in_cache(&self, stores: Vec<CacheStore>) {
        for CacheStore { pool, task, key, output } in stores {
            let key = entry_key(&pool, &task, &key);
            self.context.task_cache.flights().land(&key, &output, now_ms());
            let Some(permit) = self.context.task_cache.permit(&pool) else { continue };
            let cache = Arc::clone(&self.context.task_cache);
            tokio::spawn(async move {
                cache.store(&pool, &task, &key, output).await;
                drop(permit);
            });
        }
    }
}

/// When the attempt of `task` is due.
fn deadline_of(task: &TaskDispatch) -> Instant {
    Instant::now() + Duration::from_millis(task.deadline_ms.saturating_sub(now_ms()))
}

/// A task that `joined` the flight of `key` as a follower: its leader's result, or, when
/// the leader's attempt ends without one, the result of the flight it joins next; to a
/// worker when it leads one, or at its `deadline`; dropped once its attempt closes or its
/// shard's `loaded` is cancelled.
async fn follow(
    cache: &TaskCache,
    task: &TaskDispatch,
    joined: Joined,
    key: String,
    deadline: Instant,
    ttl_ms: Millis,
    loaded: &CancellationToken,
) -> Followed {
    let followed = cache.flights().follow(joined, key, &task.attempt, deadline, ttl_ms, loaded).await;
    if matches!(followed, Followed::Took(_)) {
        TaskCache::count_joined(&task.pool);
    }
    followed
}
